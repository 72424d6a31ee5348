"""``neuralflow demo``: the loop at the edge of stability, from a fresh install, in minutes on a CPU.

1. *Experiment*: full-batch GD on ``mlp_digits`` (250 digits, tanh 24-24, ``lr = 0.15``, a CPU replica of
   Cohen et al., ICLR 2021) with injected Gaussian noise ``nu = 1e-10`` per coordinate per step
   (``run_gd(..., noise=1e-10, noise_seed=0)``): the noise, not round-off, seeds the oscillation, so the run
   and every number after it are the same on every machine and thread count. Its oscillation is measured along
   4 tracked eigenvectors. The run reaches ``2/lr`` at step 183, stays quiet above it until about step 265
   (the *quiet stretch*, ``Trajectory.eos_transients``), is thrown back below the edge by a catapult, and
   repeats (science notes, section 7).
2. *Ladder* (:func:`neuralflow.ladder`): the ``Hg`` library fitted by the adjoint (Gauss-Newton, 3 iterations,
   started at the physics, ``init="current"``) on gradient-flow and central-flow physics (the central flow
   holding the critical eigenvalues where a window starts above ``2/lr``), and the hidden-state library on the
   oscillation flow (stage 3), in one table: each rung's gap, what its correction closed, its top revision.
   The state-only rungs carry the hidden-state diagnostic: windows that start from nearly the same state but
   need opposite corrections (quiet against oscillating).
3. *Hidden-state correction*: ``Hybrid(OscillationFlow.from_trajectory(p, traj), HiddenStateLibrary(floquet,
   drift))`` started away from the physics (growth 1 against 2, drift coupling 1 against 1/2) and fitted by the
   adjoint (``nf.fit(method="adjoint", optimizer="gauss-newton")``, 4 iterations) on 6 windows of 20 steps from
   step 220 (past the onset, across the first catapult and into the second quiet stretch), each starting
   from GD's measured oscillation, the loss with the measured variance in log scale (weight 0.01). All six windows
   train every rung's fit and measure its errors (``val_fraction=0``, so a fit returns its converged parameters):
   held out, one window of six would pick the returned iteration by itself (the growth then comes out at 1.86
   instead of 1.98) and be the only window the ladder compares. This rung
   closes the ladder's table (the same library on oscillation-flow physics; fitting it twice would double the
   cost). The floor ``q`` stays at the physics' ``nu^2``: on these windows the variance is far above it, and a
   fitted floor is not identified there.
4. *Explanation*: the report of the hidden-state fit (the learned equation of the oscillation covariance, each
   coefficient beside its theory value and the approximation it revises).
5. *Figure*: the oscillation variance on a log scale: GD's measured (``traj.oscillation``) against the
   variance ``tr X`` predicted by the fitted hybrid, by the oscillation flow with its theory coefficients and by
   the fit's starting point, each rolled out with :func:`neuralflow.simulate` from GD's iterate and measured
   oscillation 40 steps before the onset to the end of the run (each rollout's mean distance to smoothed GD is
   printed and kept in the summary).
6. *Files*: the trajectory (``.nft``), the checkpoint (``.nff``, with its report), the ladder and the report
   (Markdown), the figures (PNG) and ``summary.json`` in one output folder, named at the end. A re-run into the
   same folder first removes the files of the earlier run (the demo's own names only), so that two runs never mix.

Why this size: the hidden-state fit costs one batched Euler solve of all windows per Gauss-Newton evaluation, an
eigen-refinement and a drift backward pass per right-hand side; at 500 digits, widths (32, 32), 16 windows that is
about 13 s per solve on one thread and 4-5 minutes per fit. 250 digits with widths (24, 24) still reach the edge
with a quiet stretch and catapults, and 6 windows with 4 Gauss-Newton iterations recover the growth and the drift
coupling within the time budget (the README's demo section has the figures and the time).

``fast=True`` shrinks every stage (fewer steps, two windows, one iteration, a short rollout) for the test suite.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from .checkpoint import SUFFIX, save
from .corrections import HiddenStateLibrary, Hybrid
from .errors import NeuralflowError
from .fit import fit
from .flows import CentralFlow, GradientFlow, OscillationFlow, simulate
from .gd import run_gd
from .ladder import Ladder, ladder
from .problems import mlp_digits
from .provenance import write_json
from .report import build_report

__all__ = ["DemoSettings", "DEFAULT", "FAST", "run_demo", "variance_figure"]


@dataclass(frozen=True)
class DemoSettings:
    """Every number the demo uses. Spans are in steps relative to the EoS onset (first ``lr S >= 2``)."""

    n: int = 250
    widths: tuple[int, ...] = (24, 24)
    lr: float = 0.15
    seed: int = 0
    noise: float = 1e-10
    noise_seed: int = 0
    steps: int = 400
    n_eigs: int = 4
    ladder_terms: tuple[str, ...] = ("Hg",)
    ladder_span: tuple[int, int] = (37, 157)
    ladder_iters: int = 3
    hidden_terms: tuple[str, ...] = ("floquet", "drift")
    hidden_init: tuple[tuple[str, float], ...] = (("floquet", 1.0), ("drift", 1.0))
    fit_span: tuple[int, int] = (37, 157)
    fit_iters: int = 4
    window: int = 20
    variance_weight: float = 0.01
    val_fraction: float = 0.0
    step_size: float = 0.5
    rollout_start: int = -40
    report_windows: int = 6


DEFAULT = DemoSettings()
FAST = replace(
    DEFAULT,
    steps=240,
    ladder_span=(37, 57),
    ladder_iters=1,
    fit_span=(37, 57),
    fit_iters=1,
    window=10,
    rollout_start=-5,
    report_windows=2,
)


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, flush=True)


OUTPUT_FILES = ("trajectory.nft", "gd.png", "ladder.md", f"fit{SUFFIX}", "report.md", "variance.png", "summary.json")


def clear_previous_run(out: Path) -> None:
    """Remove the files an earlier demo run wrote into ``out`` (its own names only), so that two runs never mix.

    ``summary.json`` is written last: a folder holding it holds one complete run.
    """
    for path in [*(out / name for name in OUTPUT_FILES), *out.glob("report_*.png")]:
        path.unlink(missing_ok=True)


def variance_figure(
    steps: torch.Tensor,
    measured: torch.Tensor,
    predicted: dict[str, tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    onset: int | None = None,
) -> Any:
    """GD's measured oscillation variance against each model's predicted ``tr X`` on a log scale (a Figure).

    ``predicted`` maps a label to ``(steps, variance)``; non-finite measurements (the run's ends) are left out.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ok = torch.isfinite(measured) & (measured > 0)
    ax.semilogy(steps[ok].numpy(), measured[ok].numpy(), color="k", lw=2.2, alpha=0.5, label="GD (measured)")
    for (label, (t, v)), style in zip(predicted.items(), ("-", "--", ":", "-."), strict=False):
        ax.semilogy(t.numpy(), v.numpy(), style, lw=1.3, label=label)
    ax.set_ylim(bottom=float(measured[ok].min()) / 10)  # a model's variance that reaches 0 leaves the axis
    if onset is not None:
        ax.axvline(onset, color="0.6", lw=0.8)
        ax.text(onset, ax.get_ylim()[1], " lr S = 2", va="top", fontsize=8, color="0.4")
    ax.set_xlabel("step")
    ax.set_ylabel("oscillation variance")
    ax.set_title(f"the oscillation's size, lr = {lr:g}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _rollout(model: Hybrid, traj: Any, start: int, step_size: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``model`` from GD's iterate and measured oscillation at ``start`` to the end: steps, predicted ``tr X`` and
    the mean distance of its ``theta`` to smoothed GD (the midpoint process, defined one step in from each end)."""
    flow = model.flow
    if not isinstance(flow, OscillationFlow):
        raise NeuralflowError(f"demo: the variance rollout needs the oscillation flow, got {flow.name!r}.")
    sub = traj.slice(start, None)
    flow.reset()
    extra0 = model.initial_extra(sub.iterates[0], traj, start)
    t = sub.steps.to(sub.iterates.dtype)
    with torch.no_grad():
        states, extras = simulate(
            model,
            sub.iterates[0],
            t,
            solver="euler",
            step_size=step_size,
            extra0=extra0,
            reset=False,
            return_extra=True,
        )
    smoothed = sub.smoothed()
    distance = (states[smoothed.steps - start] - smoothed.iterates).norm(dim=1).mean()
    return sub.steps, flow.predicted_variance(cast(torch.Tensor, extras)).detach(), float(distance)  # never None here


def run_demo(
    out: str | Path = "neuralflow-demo",
    fast: bool = False,
    settings: DemoSettings | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the demo (see the module docstring) and write its files into ``out``.

    Returns a summary (settings, onset, quiet stretches, the ladder, the fitted coefficients against theory, the
    report's verdict and suggestions, the time of each stage, the files written); it is also written to
    ``out/summary.json``.
    """
    s = settings or (FAST if fast else DEFAULT)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_run(out)
    files: dict[str, str] = {}
    timing: dict[str, float] = {}
    begin = time.perf_counter()

    def stage(name: str, start: float) -> None:
        timing[name] = round(time.perf_counter() - start, 2)

    # 1. the experiment
    t0 = time.perf_counter()
    problem = mlp_digits(n=s.n, widths=s.widths, seed=s.seed)
    _say(
        f"[1/5] GD on {problem.name} ({problem.dim} parameters, {s.n} digits), lr = {s.lr:g}, {s.steps} steps, "
        f"noise {s.noise:g} per coordinate per step",
        quiet,
    )
    traj = run_gd(problem, s.lr, s.steps, n_eigs=s.n_eigs, noise=s.noise, noise_seed=s.noise_seed, progress=progress)
    onset = traj.eos_onset
    if onset is None:
        raise NeuralflowError(
            f"demo: GD did not reach the edge of stability (2/lr = {2 / s.lr:g}) within {s.steps} steps; "
            "run more steps."
        )
    quiet_stretches = traj.eos_transients()
    files["trajectory"] = str(traj.save(out / "trajectory.nft"))
    traj.plot().savefig(out / "gd.png", dpi=120)
    files["gd figure"] = str(out / "gd.png")
    _say(
        f"      sharpness reached 2/lr = {2 / s.lr:.4g} at step {onset} (the edge of stability); quiet above it "
        f"(not oscillating yet): {quiet_stretches}",
        quiet,
    )
    stage("gd", t0)

    fit_kw: dict[str, Any] = {
        "window": s.window,
        "target": "smoothed",
        "method": "adjoint",
        "optimizer": "gauss-newton",
        "solver": "euler",
        "step_size": s.step_size,
        "val_fraction": s.val_fraction,
        "progress": progress,
    }

    # 2. the ladder's state-only rungs
    t0 = time.perf_counter()
    lo, hi = onset + s.ladder_span[0], min(s.steps, onset + s.ladder_span[1])
    _say(
        f"[2/5] ladder: {' + '.join(s.ladder_terms)} fitted by the adjoint on gradient-flow and central-flow "
        f"physics, steps {lo}..{hi}",
        quiet,
    )
    state_only = ladder(
        traj.slice(lo, hi + 1),
        [GradientFlow(problem, s.lr), CentralFlow(problem, s.lr, above_edge="hold")],
        terms=s.ladder_terms,
        report_options={"max_windows": s.report_windows},
        max_iters=s.ladder_iters,
        init="current",
        **fit_kw,
    )
    stage("ladder", t0)

    # 3. the hidden-state correction on the oscillation flow
    t0 = time.perf_counter()
    lo, hi = onset + s.fit_span[0], min(s.steps, onset + s.fit_span[1])
    flow = OscillationFlow.from_trajectory(problem, traj, n_track=s.n_eigs)
    library = HiddenStateLibrary(problem, s.lr, terms=list(s.hidden_terms), init=dict(s.hidden_init))
    _say(
        f"[3/5] fitting the oscillation flow's {', '.join(s.hidden_terms)} by the adjoint, started at "
        f"{', '.join(f'{k} {v:.3g}' for k, v in library.init.items())}, steps {lo}..{hi}",
        quiet,
    )
    result = fit(
        Hybrid(flow, library),
        traj.slice(lo, hi + 1),
        max_iters=s.fit_iters,
        variance_weight=s.variance_weight,
        **fit_kw,
    )
    stage("fit", t0)

    # 4. the explanation: the hidden-state report and the whole ladder
    t0 = time.perf_counter()
    report = build_report(result, max_windows=s.report_windows)
    rungs = Ladder([*state_only.reports, report], [*state_only.results, result])
    _say("[4/5] ladder and report", quiet)
    _say(str(rungs), quiet)
    _say(str(report), quiet)
    files["checkpoint"] = str(save(result, out / f"fit{SUFFIX}", report=report))
    (out / "report.md").write_text(report.to_markdown())
    files["report"] = str(out / "report.md")
    (out / "ladder.md").write_text(rungs.to_markdown() + "\n" + state_only.reports[0].to_markdown())
    files["ladder"] = str(out / "ladder.md")
    for path in report.save_figures(out):
        files[f"report figure {path.stem}"] = str(path)
    stage("report", t0)

    # 5. the oscillation's size: GD against the fitted and the unfitted model
    t0 = time.perf_counter()
    start = max(0, onset + s.rollout_start)
    _say(
        f"[5/5] rolling out the fitted, the theory's and the starting oscillation flow from step {start} to {s.steps}",
        quiet,
    )
    with_theory = Hybrid(OscillationFlow.from_trajectory(problem, traj, n_track=s.n_eigs), None)
    as_started = Hybrid(
        OscillationFlow.from_trajectory(problem, traj, n_track=s.n_eigs),
        HiddenStateLibrary(problem, s.lr, terms=list(s.hidden_terms), init=dict(s.hidden_init)),
    )
    rollouts = {
        "fitted hybrid": _rollout(result.model, traj, start, s.step_size),
        "oscillation flow (theory)": _rollout(with_theory, traj, start, s.step_size),
        "the fit's start": _rollout(as_started, traj, start, s.step_size),
    }
    distances = {label: r[2] for label, r in rollouts.items()}
    for label, distance in distances.items():
        _say(f"      {label:<26} mean distance to smoothed GD {distance:.3g}", quiet)
    osc = traj.oscillation
    figure = variance_figure(osc.steps, osc.variance, {label: r[:2] for label, r in rollouts.items()}, s.lr, onset)
    figure.savefig(out / "variance.png", dpi=120)
    files["variance figure"] = str(out / "variance.png")
    stage("rollout", t0)
    timing["total"] = round(time.perf_counter() - begin, 2)

    theory = {k: float(v) for k, v in flow.hidden_coefficients().items() if k in s.hidden_terms}
    summary = {
        "settings": asdict(s),
        "problem": problem.description,
        "dim": problem.dim,
        "eos_onset": onset,
        "quiet_stretches": quiet_stretches,
        "ladder": rungs.to_dict(),
        "hidden_state_missing": [r.to_dict().get("hidden_state") for r in state_only.reports],
        "coefficients": result.coefficients,
        "theory": theory,
        "rollout_distance": distances,
        "physics_error": result.physics_error,
        "hybrid_error": result.hybrid_error,
        "verdict": report.verdict,
        "suggestions": report.suggestions(),
        "timing": timing,
        "files": files,
    }
    write_json(out / "summary.json", summary)
    files["summary"] = str(out / "summary.json")
    _say("", quiet)
    for what, written in files.items():
        _say(f"{what:<24} {written}", quiet)
    _say(f"\ndemo finished in {timing['total']:.0f} s; everything is in {out.resolve()}", quiet)
    return summary
