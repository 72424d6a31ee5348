"""``neuralflow demo``: the whole loop on an embedded default, from a fresh install, in minutes on a CPU.

1. *Experiment*: full-batch GD on ``mlp_digits`` (500 digits, tanh 32-32, ``lr = 0.15``, the CPU
   replica of Cohen et al., ICLR 2021 and ICLR 2025) until the sharpness has reached ``2/lr``,
   the edge of stability.
2. *Physics ladder*: the gradient, first-order modified and central flows simulated from a GD
   iterate before the onset and compared with GD across it (:func:`neuralflow.compare`).
3. *Correction*: the term library ``Hg, gradS, gradScrit`` fitted on top of gradient-flow physics to
   the smoothed iterates (midpoint process) from 85 steps before the onset to 120 steps into GD's
   oscillation, by the
   balanced derivative regression (``fit(method="regression", balance=True)``; an ODE fit needs an
   eigen-solve per state and right-hand-side evaluation, minutes per iteration at this size on a
   CPU). Every coefficient is gated on ``lr S - 2``; ``Hg`` keeps a baseline below the edge (the
   modified equation's -1/2) and may change at it. The quiet stretch past ``2/lr`` where float64
   GD does not oscillate yet (``Trajectory.eos_transients``) is left out.
4. *Explanation*: the report and its suggestion of the approximation to revise: the oscillation
   terms switching on at ``lr S = 2``, attributed to gradient flow's "no oscillation".
5. *Files*: the trajectory (``.nft``), the checkpoint (``.nff``), the report (Markdown) and the
   figures (PNG) in one output folder, named at the end. A re-run into the same folder first removes
   the files of the earlier run (the demo's own names only), so that two runs never mix.

``fast=True`` shrinks every stage (fewer steps, a shorter span, one fit iteration) for the test suite.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoint import SUFFIX, save
from .compare import compare
from .corrections import Hybrid, TermLibrary
from .errors import NeuralflowError
from .fit import fit
from .flows import CentralFlow, GradientFlow, ModifiedFlow
from .gd import run_gd
from .problems import mlp_digits
from .provenance import write_json
from .report import build_report

__all__ = ["DemoSettings", "DEFAULT", "FAST", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Every number the demo uses. Spans are in steps relative to the EoS onset (first ``lr S >= 2``)."""

    n: int = 500
    widths: tuple[int, ...] = (32, 32)
    lr: float = 0.15
    seed: int = 0
    steps: int = 560
    eig_every: int = 1
    n_eigs: int = 1
    compare_span: tuple[int, int] = (-30, 30)
    fit_span: tuple[int, int] = (-85, 325)
    terms: tuple[str, ...] = ("Hg", "gradS", "gradScrit")
    baseline: tuple[str, ...] = ("Hg",)
    window: int = 20
    step_size: float = 0.5
    eig_tol: float = 1e-3
    report_windows: int = 6


DEFAULT = DemoSettings()
FAST = replace(DEFAULT, steps=250, compare_span=(-5, 5), fit_span=(-30, 15), window=5, report_windows=2)


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, flush=True)


OUTPUT_FILES = ("trajectory.nft", "gd.png", "ladder.png", f"fit{SUFFIX}", "report.md", "summary.json")


def clear_previous_run(out: Path) -> None:
    """Remove the files an earlier demo run wrote into ``out`` (its own names only), so that two runs never mix.

    ``summary.json`` is written last: a folder holding it holds one complete run.
    """
    for path in [*(out / name for name in OUTPUT_FILES), *out.glob("report_*.png")]:
        path.unlink(missing_ok=True)


def run_demo(
    out: str | Path = "neuralflow-demo", fast: bool = False, settings: DemoSettings | None = None,
    progress: bool = True, quiet: bool = False,
) -> dict[str, Any]:
    """Run the demo (see the module docstring) and write its files into ``out``.

    Returns a summary (settings, onset, the ladder's numbers, the fitted coefficients, the
    report's verdict and suggestions, the time of each stage, the files written); it is also
    written to ``out/summary.json``.
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
    _say(f"[1/4] GD on {problem.name} ({problem.dim} parameters, {s.n} digits), lr = {s.lr:g}, {s.steps} steps", quiet)
    traj = run_gd(problem, s.lr, s.steps, eig_every=s.eig_every, n_eigs=s.n_eigs, progress=progress)
    onset = traj.eos_onset
    if onset is None:
        raise NeuralflowError(
            f"demo: GD did not reach the edge of stability (2/lr = {2 / s.lr:g}) within {s.steps} steps; "
            "run more steps."
        )
    files["trajectory"] = str(traj.save(out / "trajectory.nft"))
    traj.plot().savefig(out / "gd.png", dpi=120)
    files["gd figure"] = str(out / "gd.png")
    _say(f"      sharpness reached 2/lr = {2 / s.lr:.4g} at step {onset} (the edge of stability)", quiet)
    stage("gd", t0)

    # 2. the physics ladder across the onset
    t0 = time.perf_counter()
    lo, hi = max(0, onset + s.compare_span[0]), onset + s.compare_span[1]
    _say(f"[2/4] physics ladder: gradient -> modified (order 1) -> central flow, steps {lo}..{hi}", quiet)
    flows = (GradientFlow(problem, s.lr), ModifiedFlow(problem, s.lr, order=1), CentralFlow(problem, s.lr))
    ladder = compare(traj.slice(lo, hi + 1), *flows, problem=problem, n_probe=5, progress=progress)
    _say(str(ladder), quiet)
    ladder.figure().savefig(out / "ladder.png", dpi=120)
    files["ladder figure"] = str(out / "ladder.png")
    stage("ladder", t0)

    # 3. the correction on gradient-flow physics
    t0 = time.perf_counter()
    lo, hi = max(0, onset + s.fit_span[0]), min(s.steps, onset + s.fit_span[1])
    quiet_stretches = traj.eos_transients()
    _say(f"[3/4] fitting {' + '.join(s.terms)} (gated on lr S - 2) on gradient-flow physics to the smoothed "
         f"iterates, steps {lo}..{hi}, leaving out {quiet_stretches} (past 2/lr, not oscillating yet)", quiet)
    library = TermLibrary(problem, s.lr, terms=list(s.terms), gated=list(s.terms), baseline=list(s.baseline),
                          features=["lr_S_minus_2"], eig_tol=s.eig_tol)
    result = fit(Hybrid(flows[0], library), traj.slice(lo, hi + 1), window=s.window, target="smoothed",
                 method="regression", solver="euler", step_size=s.step_size, balance=True, exclude=quiet_stretches,
                 progress=progress)
    stage("fit", t0)

    # 4. the explanation and the files
    t0 = time.perf_counter()
    report = build_report(result, max_windows=s.report_windows)
    _say("[4/4] report", quiet)
    _say(str(report), quiet)
    files["checkpoint"] = str(save(result, out / f"fit{SUFFIX}", report=report))
    (out / "report.md").write_text(report.to_markdown())
    files["report"] = str(out / "report.md")
    for path in report.save_figures(out):
        files[f"report figure {path.stem}"] = str(path)
    stage("report", t0)
    timing["total"] = round(time.perf_counter() - begin, 2)

    summary = {
        "settings": asdict(s),
        "problem": problem.description,
        "dim": problem.dim,
        "eos_onset": onset,
        "quiet_stretches": quiet_stretches,
        "ladder": ladder.to_dict(),
        "coefficients": result.coefficients,
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
