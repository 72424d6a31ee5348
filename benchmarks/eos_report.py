"""The report at the edge of stability: which approximation to revise, on gradient-flow and central-flow physics.

GD on ``mlp_digits(n=500, widths=(32, 32), seed=0)`` at lr = 0.15 for 700 steps (sharpness every step;
the onset is at step 235, GD oscillates from step 441); the targets are the smoothed iterates
(midpoint process). One correction library is fitted on each rung of a physics ladder
(``nf.ladder``): ``Hg`` with a baseline (its coefficient below the edge of stability plus a gated change
at ``lr S = 2``), ``gradS`` and ``gradScrit`` gated on ``lr S - 2``, by the balanced derivative regression,
leaving out the quiet stretch past ``2/lr`` where GD does not oscillate yet
(``Trajectory.eos_transients``). The rungs:

1. ``GradientFlow``: no oscillation at all;
2. ``CentralFlow(above_edge="hold")``: the oscillation's drift, with the critical eigenvalues held at
   ``2/lr`` or, where smoothed GD sits above it, where they are.

Also measured: the rough part of the targets (the error of the best cubic in time through each
window's start, in the fit's normalisation), to tell a gap in the library from noise in the
targets; and a rollout of the gradient-flow hybrid from step 0, to see whether the fitted
correction is a usable dynamical model.

Prints the ladder and both reports; writes JSON (default ``benchmarks/results/eos_report.json``),
the reports as Markdown next to it and the gradient-flow report's figures.

    python benchmarks/eos_report.py [--steps 700] [--out benchmarks/results/eos_report.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from _digits_eos import LR, digits_eos_run  # noqa: E402

import neuralflow as nf
from neuralflow.flows import CentralFlow, GradientFlow  # noqa: E402
from neuralflow.provenance import write_json  # noqa: E402

TERMS = ["Hg", "gradS", "gradScrit"]


def cubic_residual(result: nf.FitResult) -> torch.Tensor:
    """Per window: the fit's normalised error of the best cubic ``x_s + a t + b t^2 + c t^3`` through the start."""
    targets, window = result.trajectory, int(result.settings["window"])
    n = window // targets.store_every
    k = torch.arange(1, n + 1, dtype=targets.iterates.dtype) / n
    V = torch.stack([k, k**2, k**3], dim=1)
    resid = torch.eye(n, dtype=V.dtype) - V @ torch.linalg.pinv(V)
    first = torch.searchsorted(targets.steps, result.windows["step"])
    x = targets.iterates[first[None, :] + torch.arange(n + 1)[:, None]]
    r = torch.einsum("ij,jbd->ibd", resid, x[1:] - x[:1])
    return r.square().sum(-1).mean(0) / result.normaliser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/eos_report.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared; two OpenMP threads were measured 30x slower here
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    p, traj, timing["gd"] = digits_eos_run(args.steps)
    quiet = traj.eos_transients()
    print(f"GD: d = {p.dim}, {args.steps} steps, onset at step {traj.eos_onset}, quiet stretches {quiet}", flush=True)

    t0 = time.perf_counter()
    ladder = nf.ladder(
        traj,
        [GradientFlow(p, LR), CentralFlow(p, LR, above_edge="hold")],
        terms=TERMS,
        gated=TERMS,
        baseline=["Hg"],
        features=["lr_S_minus_2"],
        report_options={"max_windows": 8},
        window=args.window,
        target="smoothed",
        method="regression",
        solver="euler",
        step_size=0.5,
        balance=True,
        exclude=quiet,
        progress=False,
    )
    timing["ladder"] = time.perf_counter() - t0
    print(ladder)
    for report in ladder.reports:
        print(report)
        (out.parent / f"eos_report_{report.physics}.md").write_text(report.to_markdown())
    gradient = ladder.results[0]
    ladder.reports[0].save_figures(out.parent / "eos_report_figures")

    rough = cubic_residual(gradient)
    shown = gradient.windows["validation"]
    print(
        f"rough part of the targets (best cubic per window): {float(rough[shown].mean()):.3g} on the validation "
        f"windows, against the gradient-flow error {gradient.physics_error:.3g}"
    )

    t0 = time.perf_counter()
    t = torch.arange(len(traj.smoothed()) + 1, dtype=p.dtype)
    try:
        states = nf.simulate(gradient.model, p.theta0, t, solver="euler", step_size=0.5)
        rollout = {"blew_up": None, "final_distance": float((states[-1] - traj.smoothed().iterates[-1]).norm())}
    except nf.DivergenceError as err:
        rollout = {"blew_up": str(err)}
    timing["rollout"] = time.perf_counter() - t0
    print(f"rollout of the gradient-flow hybrid from step 0: {rollout}")

    write_json(
        out,
        {
            "settings": {
                "n": 500,
                "widths": [32, 32],
                "lr": LR,
                "steps": args.steps,
                "window": args.window,
                "terms": TERMS,
                "baseline": ["Hg"],
                "quiet_stretches": quiet,
                "eos_onset": traj.eos_onset,
            },
            "ladder": ladder.to_dict(),
            "rough_part": {
                "validation_mean": float(rough[shown].mean()),
                "per_window": rough.tolist(),
                "window_steps": gradient.windows["step"].tolist(),
            },
            "rollout": rollout,
            "timing": timing,
        },
        indent=1,
    )
    print(f"wrote {out}; timing {json.dumps({k: round(v, 1) for k, v in timing.items()})}")


if __name__ == "__main__":
    main()
