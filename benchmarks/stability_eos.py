"""Stability of the EoS demo's conclusions: its fit repeated on delete-half block resamples of the fitted span.

Runs the demo's experiment and fit (``neuralflow.demo.DEFAULT``: digits n 500, widths (32, 32), lr 0.15, the
gated ``Hg, gradS, gradScrit`` regression on the smoothed iterates around the EoS onset) and then
:func:`neuralflow.stability` with ``--replicates`` re-fits on a random half of ``--blocks`` blocks of steps each.
Prints the table and writes ``results/stability_eos.json``.

    python benchmarks/stability_eos.py [--replicates 10] [--blocks 8]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

import neuralflow as nf
from neuralflow.demo import DEFAULT
from neuralflow.provenance import write_json

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = DEFAULT
    problem = nf.problems.mlp_digits(n=s.n, widths=s.widths, seed=s.seed)
    traj = nf.run_gd(problem, s.lr, s.steps, eig_every=s.eig_every, n_eigs=s.n_eigs, progress=False)
    onset = traj.eos_onset
    lo, hi = max(0, onset + s.fit_span[0]), min(s.steps, onset + s.fit_span[1])
    library = nf.corrections.TermLibrary(
        problem,
        s.lr,
        terms=list(s.terms),
        gated=list(s.terms),
        baseline=list(s.baseline),
        features=["lr_S_minus_2"],
        eig_tol=s.eig_tol,
    )
    span = traj.slice(lo, hi + 1)
    result = nf.fit(
        nf.Hybrid(nf.flows.GradientFlow(problem, s.lr), library),
        span,
        window=s.window,
        target="smoothed",
        method="regression",
        solver="euler",
        step_size=s.step_size,
        balance=True,
        exclude=traj.eos_transients(),
        progress=False,
    )
    t0 = time.perf_counter()
    st = nf.stability(result, span, replicates=args.replicates, blocks=args.blocks, max_windows=s.report_windows)
    seconds = time.perf_counter() - t0
    print(f"EoS demo fit (steps {lo}..{hi}, onset {onset}); {seconds:.0f} s for {args.replicates} re-fits")
    print(st)
    out = write_json(
        HERE / "results" / "stability_eos.json",
        {**asdict(st), "seconds": round(seconds, 1), "span": [lo, hi], "onset": onset},
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
