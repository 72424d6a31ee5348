"""Compare flows with the GD experiment (the analysis above the physics).

:func:`compare` simulates each flow from a trajectory's first iterate and tabulates how far it stays
from GD's iterates, from the smoothed iterates (the midpoint process of Cohen et al. 2025), and how well it
predicts the loss, the time-averaged loss and the sharpness.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._display import data_frame, html_table
from ._validate import renamed
from .autodiff import top_eigenpairs
from .errors import InputError
from .flows.base import Flow
from .flows.central import CentralFlow
from .flows.oscillation import OscillationFlow
from .flows.simulate import simulate
from .oscillation import first_established
from .problems import Problem, make
from .trajectory import Trajectory

__all__ = ["compare", "Comparison", "FlowRecord"]


@dataclass
class FlowRecord:
    """One flow simulated along a trajectory: states at the trajectory's stored steps and diagnostics.

    ``probe`` indexes the stored steps where sharpness (and, for a central flow, its predicted
    time-averaged loss) were evaluated. A flow with extra state keeps it in ``extra`` (one per stored
    step); ``variance`` is its predicted oscillation variance (``tr X`` for the oscillation flow), to set
    beside GD's measured ``trajectory.oscillation.variance``.
    """

    name: str
    states: Tensor
    distance: Tensor
    distance_smoothed: Tensor | None
    loss: Tensor
    probe: Tensor
    sharpness: Tensor
    predicted_loss: Tensor
    seconds: float
    extra: Tensor | None = None
    variance: Tensor | None = None


@dataclass
class Comparison:
    """The result of :func:`compare`: ``records`` per flow and the GD reference on the same steps."""

    trajectory: Trajectory
    records: list[FlowRecord]
    gd_sharpness: Tensor
    gd_loss_avg: Tensor
    half_width: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        probe_steps = self.trajectory.steps
        gd_loss = self.trajectory.loss
        onset = self.trajectory.eos_onset
        for r in self.records:
            p = r.probe
            rel = lambda a, b: float(((a - b).abs() / b.abs().clamp_min(1e-300)).mean())  # noqa: E731
            self.rows.append(
                {
                    "flow": r.name,
                    "distance": float(r.distance[1:].mean()) if len(r.distance) > 1 else 0.0,
                    "distance_smoothed": None if r.distance_smoothed is None else float(r.distance_smoothed.mean()),
                    "final_distance": float(r.distance[-1]),
                    "loss_error": rel(r.loss, gd_loss),
                    "avg_loss_error": rel(r.predicted_loss, self.gd_loss_avg[p]),
                    "sharpness_error": rel(r.sharpness, self.gd_sharpness),
                    "seconds": r.seconds,
                    "probe_steps": [int(s) for s in probe_steps[p]],
                    "established": self._established(r, onset),
                }
            )

    def _established(self, record: FlowRecord, onset: int | None) -> int | None:
        """The step past GD's EoS onset at which the flow's predicted oscillation becomes established (the rule
        of :mod:`neuralflow.oscillation`, on its variance and its own step), or None."""
        if record.variance is None or onset is None or len(record.states) < 2:
            return None
        step = (record.states[1:] - record.states[:-1]).norm(dim=1) / torch.diff(self.trajectory.times)
        step = torch.cat([step, step.new_full((1,), math.nan)])
        return first_established(self.trajectory.steps, record.variance, step, onset)

    @property
    def gd_established(self) -> int | None:
        """The step past the EoS onset at which GD's measured oscillation becomes established, or None."""
        onset = self.trajectory.eos_onset
        return None if onset is None else self.trajectory.oscillation.first_established(onset)

    def __str__(self) -> str:
        tr = self.trajectory
        head = (
            f"flows against GD on {tr.problem.get('name', 'problem')} (lr = {tr.lr:g}, steps "
            f"{int(tr.steps[0])}..{int(tr.steps[-1])}); distances are Euclidean in parameter space, means over "
            f"the stored steps; errors relative. avg loss: predicted time-averaged loss vs GD's loss averaged "
            f"over +-{self.half_width} steps.\n"
        )
        heads = [
            "flow",
            "dist GD",
            "dist smoothed",
            "final dist",
            "loss err",
            "avg loss err",
            "sharp err",
            "osc. established",
            "time s",
        ]
        cells = self._cells()
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        line = lambda xs: "  ".join(  # noqa: E731
            x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths, strict=True))
        )
        table = "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])
        if any(r.variance is not None for r in self.records):
            table += f"\nGD's oscillation established at step {self.gd_established} (EoS onset {tr.eos_onset})."
        return head + table

    def __repr__(self) -> str:
        tr = self.trajectory
        flows = ", ".join(f"{r['flow']} {r['distance']:.3g}" for r in self.rows)
        return (
            f"Comparison({tr.problem.get('name', 'problem')}, lr={tr.lr:g}, steps {int(tr.steps[0])}.."
            f"{int(tr.steps[-1])}; mean distance to GD: {flows})"
        )

    _COLUMNS = (
        "flow",
        "distance",
        "distance_smoothed",
        "final_distance",
        "loss_error",
        "avg_loss_error",
        "sharpness_error",
        "established",
        "seconds",
    )

    def _cells(self) -> list[list[str]]:
        fmt = lambda v: "-" if v is None else (str(v) if isinstance(v, (str, int)) else f"{v:.4g}")  # noqa: E731
        return [[fmt(row[c]) for c in self._COLUMNS] for row in self.rows]

    def _repr_html_(self) -> str:
        tr = self.trajectory
        caption = (
            f"flows against GD on {tr.problem.get('name', 'problem')}, lr = {tr.lr:g}, steps "
            f"{int(tr.steps[0])}..{int(tr.steps[-1])}"
        )
        return html_table(self._COLUMNS, self._cells(), caption)

    def to_frame(self) -> Any:
        """One row per flow (the numbers of :meth:`__str__`), indexed by flow name, as a pandas DataFrame."""
        return data_frame([{c: row[c] for c in self._COLUMNS} for row in self.rows]).set_index("flow")

    @property
    def window(self) -> int:
        """The old name of :attr:`half_width` (deprecated)."""
        return self.half_width

    def to_dict(self) -> dict[str, Any]:
        tr = self.trajectory
        return {
            "problem": tr.problem,
            "lr": tr.lr,
            "steps": [int(tr.steps[0]), int(tr.steps[-1])],
            "half_width": self.half_width,
            "gd_established": self.gd_established,
            "flows": self.rows,
        }

    def figure(self, ax: Any = None) -> Any:
        """Distance to GD (raw and smoothed), loss, and sharpness over steps; returns the figure.

        ``ax``: matplotlib axes to draw into (distance, loss, sharpness, and the oscillation variance when a
        flow predicts one); default a new figure.
        """
        import matplotlib.pyplot as plt

        tr = self.trajectory
        steps = tr.steps.cpu().numpy()
        with_variance = any(r.variance is not None for r in self.records)
        if ax is None:
            fig, axes = plt.subplots(3 + with_variance, 1, figsize=(7, 8 + 2.5 * with_variance), sharex=True)
        else:
            axes = list(ax)
            if len(axes) != 3 + with_variance:
                raise InputError(
                    f"Comparison.figure: pass {3 + with_variance} axes (distance, loss, sharpness"
                    f"{', oscillation variance' if with_variance else ''}), got {len(axes)}."
                )
            fig = axes[0].figure
        ax_d, ax_l, ax_s = axes[:3]
        if with_variance:
            ax_v = axes[3]
            osc = tr.oscillation
            ax_v.semilogy(osc.steps.cpu().numpy(), osc.variance.cpu().numpy(), color="k", lw=0.8, label="GD, measured")
        ax_l.semilogy(steps, tr.loss.cpu().numpy(), color="0.7", lw=0.8, label="GD")
        ax_l.semilogy(steps, self.gd_loss_avg.cpu().numpy(), color="k", lw=1, label=f"GD, +-{self.half_width} avg")
        probe_steps = steps[self.records[0].probe.cpu().numpy()] if self.records else steps[:0]
        ax_s.plot(probe_steps, self.gd_sharpness.cpu().numpy(), "k.", ms=3, label="GD")
        for r in self.records:
            (ln,) = ax_d.semilogy(steps[1:], r.distance[1:].cpu().numpy(), lw=1, label=r.name)
            if r.distance_smoothed is not None:
                ax_d.semilogy(steps[1:-1], r.distance_smoothed.cpu().numpy(), lw=1, ls="--", color=ln.get_color())
            ax_l.semilogy(steps, r.loss.cpu().numpy(), lw=1, color=ln.get_color(), label=r.name)
            if r.name == "central":
                ax_l.semilogy(
                    steps[r.probe.cpu().numpy()],
                    r.predicted_loss.cpu().numpy(),
                    ls=":",
                    lw=1.5,
                    color=ln.get_color(),
                    label="central, predicted avg",
                )
            ax_s.plot(steps[r.probe.cpu().numpy()], r.sharpness.cpu().numpy(), lw=1, color=ln.get_color(), label=r.name)
            if r.variance is not None:
                ax_v.semilogy(steps, r.variance.cpu().numpy(), lw=1, color=ln.get_color(), label=f"{r.name}, predicted")
        ax_s.axhline(tr.eos_threshold, color="k", ls="--", lw=0.8, label="2 / lr")
        ax_d.set_ylabel("distance to GD\n(dashed: to smoothed GD)")
        ax_l.set_ylabel("loss")
        ax_s.set_ylabel("sharpness")
        if with_variance:
            ax_v.set_ylabel("oscillation variance")
        axes[-1].set_xlabel("step")
        for a in axes:
            a.legend(fontsize="small", loc="best")
        ax_d.set_title(f"flows vs GD on {tr.problem.get('name', 'problem')}, lr = {tr.lr:g}")
        fig.tight_layout()
        return fig


def _moving_average(x: Tensor, half_width: int) -> Tensor:
    """Centred moving average over ``+-half_width`` entries, truncated at the ends."""
    c = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
    idx = torch.arange(len(x), device=x.device)
    lo, hi = (idx - half_width).clamp(min=0), (idx + half_width + 1).clamp(max=len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def compare(
    trajectory: Trajectory,
    *flows: Flow,
    problem: Problem | None = None,
    steps: int | None = None,
    half_width: int = 10,
    n_probe: int = 50,
    progress: bool = False,
    solver: str | None = None,
    step_size: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    window: int | None = None,
    method: str | None = None,
) -> Comparison:
    """Simulate each flow from the trajectory's first iterate and compare it with GD.

    Per flow: distance to the GD iterates and, for a dense recording, to the smoothed iterates (the midpoint
    process of Cohen et al. 2025, interior steps); relative loss error; at ``n_probe`` evenly spaced stored steps
    the sharpness (LOBPCG, warm-started) against GD's, and the predicted time-averaged loss
    (``CentralFlow.predicted_loss``, ``OscillationFlow``'s ``L + 1/2 <H, Sigma>``; the loss itself for other
    flows) against GD's loss averaged over ``+-half_width`` steps. A flow with extra state starts it from the
    trajectory (``flow.initial_extra``); the oscillation flow's predicted variance and the step at which its
    oscillation becomes established are reported beside GD's.

    Parameters
    ----------
    trajectory : Trajectory
        The GD run, from :func:`~neuralflow.gd.run_gd`.
    *flows : Flow
        The flows to compare, each at the trajectory's ``lr``; at least one.
    problem : Problem, optional
        The problem the run was on; None: rebuilt from ``trajectory.problem`` (``problems.make``).
    steps : int, optional
        Compare only the stored steps ``<= steps``; None: all.
    half_width : int, default 10
        GD's loss is averaged over ``+-half_width`` steps for the time-averaged-loss error.
    n_probe : int, default 50
        How many evenly spaced stored steps the sharpness is evaluated at.
    progress : bool, default False
        Show a tqdm bar per flow.
    solver : str, optional
        A torchdiffeq method for every flow (:func:`~neuralflow.flows.simulate`); None: each flow's own solver.
    step_size : float, optional
        The solver's fixed step, in steps.
    rtol : float, optional
        The solver's relative tolerance.
    atol : float, optional
        The solver's absolute tolerance.
    window : int, optional
        Deprecated old name of ``half_width`` (a fit's ``window`` is its shooting window).
    method : str, optional
        Deprecated old name of ``solver`` (a fit's ``method`` is its gradient method).

    Returns
    -------
    Comparison
        ``records`` per flow and one row per flow in ``rows`` (``str()`` prints the table, ``to_frame()``
        gives a DataFrame, ``plot()`` the figure).

    Raises
    ------
    InputError
        Without flows, with a flow at another ``lr``, or with fewer than two stored steps.
    DivergenceError
        When a flow blows up (from :func:`~neuralflow.flows.simulate`).
    """
    half_width = renamed(half_width, window, "window -> half_width", "compare", default=10)
    solver = renamed(solver, method, "method -> solver", "compare")
    if not flows:
        raise InputError("compare: pass at least one flow, e.g. compare(traj, GradientFlow(problem, traj.lr)).")
    if problem is None:
        problem = make(trajectory.problem)
    for f in flows:
        if not isinstance(f, Flow):
            raise InputError(f"compare: expected neuralflow flows, got {type(f).__name__}.")
        if abs(f.lr - trajectory.lr) > 1e-12 * trajectory.lr:
            raise InputError(
                f"compare: flow {f.name!r} has lr = {f.lr:g} but the trajectory was run with {trajectory.lr:g}."
            )
    tr = trajectory if steps is None else trajectory.slice(None, steps + 1)
    if len(tr) < 2:
        raise InputError("compare: the trajectory needs at least 2 stored steps.")
    tr = tr.to(problem.device)
    gd = tr.iterates
    dense = tr.store_every == 1 and len(tr) >= 3
    smooth = tr.smoothed().iterates if dense else None
    if tr.history:
        full = _moving_average(tr.history["loss"], half_width)
        gd_loss_avg = full[tr.steps - int(tr.history["step"][0])]
    else:
        gd_loss_avg = _moving_average(tr.loss, max(1, half_width // tr.store_every))
    probe = torch.unique(torch.linspace(0, len(tr) - 1, min(n_probe, len(tr))).round().long()).to(gd.device)

    def sharpness(states: Tensor) -> Tensor:
        out, block = [], None
        for th in states:
            eig = top_eigenpairs(problem, th, k=1, v0=block, tol=1e-4)
            block = eig.block
            out.append(eig.values[0])
        return torch.stack(out)

    gd_sharp = sharpness(gd[probe])
    records = []
    for f in flows:
        start = time.perf_counter()
        extra0 = None if f.extra_state is None else f.initial_extra(gd[0], tr)
        states, extras = simulate(
            f, gd[0], tr.times, solver, step_size, rtol, atol, progress=progress, extra0=extra0, return_extra=True
        )
        seconds = time.perf_counter() - start
        with torch.no_grad():
            loss = torch.stack([problem.loss(th) for th in states])
        variance = None
        if isinstance(f, CentralFlow):
            solved = [f.solve(th) for th in states[probe]]
            sharp = torch.stack([s.values[0] for s in solved])
            predicted = torch.stack([s.predicted_loss for s in solved])
        elif isinstance(f, OscillationFlow):
            assert extras is not None  # the flow's covariance, which it carries
            seen = [f.state_at(states[i], extras[i]) for i in probe]
            sharp = torch.stack([s.values[0] for s in seen])
            predicted = torch.stack([s.predicted_loss for s in seen])
            variance = f.predicted_variance(extras)
        else:
            sharp, predicted = sharpness(states[probe]), loss[probe]
        records.append(
            FlowRecord(
                name=f.name,
                states=states,
                distance=(states - gd).norm(dim=1),
                distance_smoothed=None if smooth is None else (states[1:-1] - smooth).norm(dim=1),
                loss=loss,
                probe=probe,
                sharpness=sharp,
                predicted_loss=predicted,
                seconds=seconds,
                extra=extras,
                variance=variance,
            )
        )
    return Comparison(tr, records, gd_sharp, gd_loss_avg, half_width)
