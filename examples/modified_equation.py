"""Backward error analysis from data: recover ``-1/2 H g`` and the second-order terms from GD iterates.

GD is explicit Euler on gradient flow; its modified equation (Hairer, Lubich, Wanner, *Geometric
Numerical Integration*, ch. IX) is, in step time,

    dtheta/dt = -lr g - 1/2 lr^2 H g - lr^3 [1/3 H^2 g + 1/12 D3L[g, g]] + O(lr^4).

The script runs GD on a small tanh net on the digits (well below the edge of stability), fits the
library ``[Hg, H2g, D3gg]`` on top of gradient-flow physics, and prints the coefficients against
theory (-1/2, -1/3, -1/12) with their standard errors: first by derivative regression (the SINDy
baseline, instant), then by the ODE fit (Gauss-Newton on multiple-shooting windows). Higher-order
terms bias ``H2g`` and ``D3gg`` by roughly ``lr * S``.

Run ``python examples/modified_equation.py`` (a minute) or with ``--fast`` (seconds);
``--save PATH`` writes the ODE fit as a checkpoint.
"""

import argparse

import torch

import neuralflow as nf
from neuralflow import checkpoint

THEORY = {"Hg": -1 / 2, "H2g": -1 / 3, "D3gg": -1 / 12}


def main(argv: list[str] | None = None) -> nf.FitResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps and fit iterations (for tests)")
    parser.add_argument("--save", default=None, help="write the ODE fit to this checkpoint (.nff)")
    args = parser.parse_args(argv)
    steps, iters, window = (60, 1, 20) if args.fast else (1000, 4, 100)

    problem = nf.problems.mlp_digits(n=64, widths=(8,), seed=0)
    lr = 0.01
    traj = nf.run_gd(problem, lr, steps, eig_every=20, progress=not args.fast)
    print(
        f"{problem.name}: {problem.dim} parameters, lr = {lr}, sharpness up to "
        f"{float(traj.sharpness[torch.isfinite(traj.sharpness)].max()):.3g} (2/lr = {2 / lr:g})"
    )

    def library() -> nf.Hybrid:
        return nf.Hybrid(nf.flows.GradientFlow(problem, lr), nf.corrections.TermLibrary(problem, lr, list(THEORY)))

    regression = nf.fit(library(), traj, window=window, method="regression", progress=False)
    ode = nf.fit(library(), traj, window=window, max_iters=iters, progress=not args.fast)
    print(f"{'term':<6} {'theory':>9} {'regression':>22} {'ODE fit':>22}")
    for name, theory in THEORY.items():
        cells = [f"{r.coefficients[name]:+.4f} +- {r.uncertainty[name]:.1e}" for r in (regression, ode)]
        print(f"{name:<6} {theory:>+9.4f} {cells[0]:>22} {cells[1]:>22}")
    print(f"window error: gradient flow {ode.physics_error:.3g} -> corrected {ode.hybrid_error:.3g}")
    if args.save:
        print(f"checkpoint: {checkpoint.save(ode, args.save)}")
    return ode


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
