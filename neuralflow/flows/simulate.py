"""Integrate flows with torchdiffeq and compare them with the GD experiment.

:func:`simulate` returns a flow's states at given step times; :func:`compare` simulates each flow
from a trajectory's first iterate and tabulates how far it stays from GD's iterates, from the
smoothed iterates (the midpoint process of Cohen et al. 2025), and how well it
predicts the loss, the time-averaged loss and the sharpness.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from .._display import data_frame, html_table
from ..autodiff import top_eigenpairs
from ..errors import DivergenceError, InputError
from ..oscillation import first_established
from ..problems import Problem, make
from ..trajectory import Trajectory
from .base import Flow
from .central import CentralFlow
from .oscillation import OscillationFlow

__all__ = ["simulate", "compare", "Comparison", "FlowRecord", "DEFAULT_SOLVER"]

DEFAULT_SOLVER: dict[str, Any] = {"method": "dopri5", "rtol": 1e-7, "atol": 1e-9}


class _NonFinite(Exception):
    def __init__(self, t: float) -> None:
        self.t = t


class _Guarded(torch.nn.Module):
    """The flow, plus a progress bar over step time and a check that every evaluation is finite."""

    def __init__(self, flow: Flow, bar: tqdm) -> None:
        super().__init__()
        self.flow, self.bar = flow, bar
        self.t_reached = -math.inf

    def forward(self, t: Tensor, theta: Tensor) -> Tensor:
        tf = float(t)
        if not torch.isfinite(theta).all():
            raise _NonFinite(tf)
        out = self.flow(t, theta)
        if not torch.isfinite(out).all():
            raise _NonFinite(tf)
        if tf > self.t_reached:
            self.bar.update(max(0.0, min(tf, self.bar.total) - self.bar.n))
            self.t_reached = tf
        return out


def simulate(
    flow: Flow,
    theta0: Tensor,
    t: Tensor,
    method: str | None = None,
    step_size: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    progress: bool = False,
    extra0: Tensor | None = None,
    return_extra: bool = False,
    reset: bool = True,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Integrate ``dtheta/dt = flow(t, theta)`` from ``theta0`` at ``t[0]``; states at ``t``, shape ``(len(t), d)``.

    A flow that carries state beyond ``theta`` (``flow.extra_state``, e.g. the oscillation flow's covariance
    ``X``) starts it from ``extra0``, by default ``flow.initial_extra(theta0)``; it is integrated from one
    output time to the next, with ``flow.rebase`` in between (output times one step apart keep its basis
    fresh). ``return_extra=True`` returns ``(theta states, extra states)``, the latter ``(len(t), *shape)``
    (None for a flow without extra state). ``reset=False`` keeps the flow's warm state (to resume a saved
    simulation, :func:`neuralflow.checkpoint.load_simulation`).

    Times are step times (iterate ``k`` at ``t = k``), increasing. The solver defaults to the flow's
    own choice (``flow.solver``: explicit Euler with 2 substeps per step for :class:`CentralFlow`)
    or else ``dopri5`` with ``rtol=1e-7, atol=1e-9``; ``step_size`` sets a fixed-grid solver's step.
    Stateful flows are reset first. A non-finite state or velocity, or a step-size underflow, raises
    :class:`DivergenceError` naming the time reached.
    """
    if not isinstance(flow, Flow):
        raise InputError(f"simulate: flow must be a neuralflow Flow, got {type(flow).__name__}.")
    flow.problem.check_theta(theta0, "theta0")
    if theta0.dim() != 1:
        raise InputError("simulate: theta0 must be one parameter vector (d,).")
    if not torch.isfinite(theta0).all():
        raise InputError("simulate: theta0 contains NaN or inf values.")
    t = torch.as_tensor(t, dtype=theta0.dtype, device=theta0.device)
    if t.dim() != 1 or len(t) < 2 or not bool((t.diff() > 0).all()):
        raise InputError("simulate: t must be a 1-D tensor of at least 2 strictly increasing step times.")
    solver = {**DEFAULT_SOLVER, **getattr(flow, "solver", {})}
    solver["options"] = dict(solver.get("options", {}))
    if method is not None and method != solver["method"]:
        solver = {**DEFAULT_SOLVER, "method": method, "options": {}}
    if step_size is not None:
        solver["options"]["step_size"] = float(step_size)
    if rtol is not None:
        solver["rtol"] = rtol
    if atol is not None:
        solver["atol"] = atol
    if reset and hasattr(flow, "reset"):
        flow.reset()
    if flow.extra_state is not None and extra0 is None:
        extra0 = flow.initial_extra(theta0)
    y0 = flow.join(theta0.detach(), extra0)
    span = float(t[-1] - t[0])
    with tqdm(total=span, desc=f"{flow.name} flow", unit="step", disable=not progress) as bar:
        func = _Guarded(flow, bar)
        try:
            with torch.no_grad():
                if flow.extra_state is None:
                    states = odeint(func, y0, t, **solver)
                else:
                    ys = [y0]
                    for i in range(len(t) - 1):
                        ys.append(flow.rebase(odeint(func, ys[-1], t[i : i + 2], **solver)[-1]))
                    states = torch.stack(ys)
        except _NonFinite as err:
            raise DivergenceError(
                f"{flow.name} flow blew up: non-finite state or velocity at t = {err.t:.6g} (step time; "
                f"integrating {float(t[0]):g}..{float(t[-1]):g}). Lower lr or integrate a shorter span."
            ) from None
        except AssertionError as err:  # torchdiffeq's "underflow in dt"
            raise DivergenceError(
                f"{flow.name} flow: the solver's step size underflowed at t = {func.t_reached:.6g} ({err}); the "
                "flow blows up or is too stiff there. Try method='euler' with a small step_size."
            ) from None
    if not torch.isfinite(states).all():
        bad = int(torch.nonzero(~torch.isfinite(states).all(dim=1))[0])
        raise DivergenceError(f"{flow.name} flow produced non-finite states at t = {float(t[bad]):.6g}.")
    thetas, extras = flow.split(states)
    return (thetas, extras) if return_extra else thetas


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
    window: int
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
            f"over +-{self.window} steps.\n"
        )
        heads = ["flow", "dist GD", "dist smoothed", "final dist", "loss err", "avg loss err", "sharp err",
                 "osc. established", "time s"]
        cells = self._cells()
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        line = lambda xs: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))  # noqa: E731
        table = "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])
        if any(r.variance is not None for r in self.records):
            table += f"\nGD's oscillation established at step {self.gd_established} (EoS onset {tr.eos_onset})."
        return head + table

    def __repr__(self) -> str:
        tr = self.trajectory
        flows = ", ".join(f"{r['flow']} {r['distance']:.3g}" for r in self.rows)
        return (f"Comparison({tr.problem.get('name', 'problem')}, lr={tr.lr:g}, steps {int(tr.steps[0])}.."
                f"{int(tr.steps[-1])}; mean distance to GD: {flows})")

    _COLUMNS = ("flow", "distance", "distance_smoothed", "final_distance", "loss_error", "avg_loss_error",
                "sharpness_error", "established", "seconds")

    def _cells(self) -> list[list[str]]:
        fmt = lambda v: "-" if v is None else (str(v) if isinstance(v, (str, int)) else f"{v:.4g}")  # noqa: E731
        return [[fmt(row[c]) for c in self._COLUMNS] for row in self.rows]

    def _repr_html_(self) -> str:
        tr = self.trajectory
        caption = (f"flows against GD on {tr.problem.get('name', 'problem')}, lr = {tr.lr:g}, steps "
                   f"{int(tr.steps[0])}..{int(tr.steps[-1])}")
        return html_table(self._COLUMNS, self._cells(), caption)

    def to_frame(self) -> Any:
        """One row per flow (the numbers of :meth:`__str__`), indexed by flow name, as a pandas DataFrame."""
        return data_frame([{c: row[c] for c in self._COLUMNS} for row in self.rows]).set_index("flow")

    def to_dict(self) -> dict[str, Any]:
        tr = self.trajectory
        return {
            "problem": tr.problem,
            "lr": tr.lr,
            "steps": [int(tr.steps[0]), int(tr.steps[-1])],
            "window": self.window,
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
                raise InputError(f"Comparison.figure: pass {3 + with_variance} axes (distance, loss, sharpness"
                                 f"{', oscillation variance' if with_variance else ''}), got {len(axes)}.")
            fig = axes[0].figure
        ax_d, ax_l, ax_s = axes[:3]
        if with_variance:
            ax_v = axes[3]
            osc = tr.oscillation
            ax_v.semilogy(osc.steps.cpu().numpy(), osc.variance.cpu().numpy(), color="k", lw=0.8, label="GD, measured")
        ax_l.semilogy(steps, tr.loss.cpu().numpy(), color="0.7", lw=0.8, label="GD")
        ax_l.semilogy(steps, self.gd_loss_avg.cpu().numpy(), color="k", lw=1, label=f"GD, +-{self.window} avg")
        probe_steps = steps[self.records[0].probe.cpu().numpy()] if self.records else steps[:0]
        ax_s.plot(probe_steps, self.gd_sharpness.cpu().numpy(), "k.", ms=3, label="GD")
        for r in self.records:
            (ln,) = ax_d.semilogy(steps[1:], r.distance[1:].cpu().numpy(), lw=1, label=r.name)
            if r.distance_smoothed is not None:
                ax_d.semilogy(steps[1:-1], r.distance_smoothed.cpu().numpy(), lw=1, ls="--", color=ln.get_color())
            ax_l.semilogy(steps, r.loss.cpu().numpy(), lw=1, color=ln.get_color(), label=r.name)
            if r.name == "central":
                ax_l.semilogy(
                    steps[r.probe.cpu().numpy()], r.predicted_loss.cpu().numpy(), ls=":", lw=1.5,
                    color=ln.get_color(), label="central, predicted avg",
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


def _window_average(x: Tensor, window: int) -> Tensor:
    """Centred moving average over ``+-window`` entries, truncated at the ends."""
    c = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
    idx = torch.arange(len(x), device=x.device)
    lo, hi = (idx - window).clamp(min=0), (idx + window + 1).clamp(max=len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def compare(
    trajectory: Trajectory,
    *flows: Flow,
    problem: Problem | None = None,
    steps: int | None = None,
    window: int = 10,
    n_probe: int = 50,
    progress: bool = False,
    method: str | None = None,
    step_size: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> Comparison:
    """Simulate each flow from the trajectory's first iterate and compare it with GD.

    The problem is rebuilt from ``trajectory.problem`` (``problems.make``) unless given. ``steps``
    limits the comparison to stored steps ``<= steps``. Per flow: distance to the GD iterates and,
    for a dense recording, to the smoothed iterates (interior steps); relative loss error; at
    ``n_probe`` evenly spaced stored steps the sharpness (LOBPCG, warm-started) against GD's, and the
    predicted time-averaged loss (``CentralFlow.predicted_loss``, ``OscillationFlow``'s ``L + 1/2 <H, Sigma>``;
    the loss itself for other flows) against GD's loss averaged over ``+-window`` steps. A flow with extra
    state starts it from the trajectory (``flow.initial_extra``); the oscillation flow's predicted variance
    and the step at which its oscillation becomes established are reported beside GD's. ``method``,
    ``step_size``, ``rtol`` and ``atol`` go to :func:`simulate` for every flow (default: each flow's own solver).
    """
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
        full = _window_average(tr.history["loss"], window)
        gd_loss_avg = full[tr.steps - int(tr.history["step"][0])]
    else:
        gd_loss_avg = _window_average(tr.loss, max(1, window // tr.store_every))
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
        states, extras = simulate(f, gd[0], tr.times, method, step_size, rtol, atol, progress=progress,
                                  extra0=extra0, return_extra=True)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            loss = torch.stack([problem.loss(th) for th in states])
        if isinstance(f, CentralFlow):
            solved = [f.solve(th) for th in states[probe]]
            sharp = torch.stack([s.values[0] for s in solved])
            predicted = torch.stack([s.predicted_loss for s in solved])
        elif isinstance(f, OscillationFlow):
            seen = [f.state_at(states[i], extras[i]) for i in probe]
            sharp = torch.stack([s.values[0] for s in seen])
            predicted = torch.stack([s.predicted_loss for s in seen])
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
                variance=None if not isinstance(f, OscillationFlow) else f.predicted_variance(extras),
            )
        )
    return Comparison(tr, records, gd_sharp, gd_loss_avg, window)
