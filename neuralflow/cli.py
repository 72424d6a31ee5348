"""Command line: ``neuralflow run-gd | compare | fit | report | demo`` (also ``python -m neuralflow``).

Each subcommand is a function ``cmd_<name>(args)`` registered in :data:`COMMANDS` with the
function that adds its arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import DivergenceError, NeuralflowError


def _names(text: str) -> list[str]:
    """The names in a comma-separated option, stripped, empty ones dropped."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _problem_from_args(args: argparse.Namespace):
    from . import problems

    if args.problem == "mlp-digits":
        return problems.mlp_digits(n=args.n, widths=tuple(args.widths), seed=args.seed)
    if args.problem == "zhu-quartic":
        return problems.zhu_quartic()
    if args.problem == "scalar-factorization":
        return problems.scalar_factorization(args.depth)
    raise NeuralflowError(f"unknown problem {args.problem!r}")


def _add_run_gd(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem", default="mlp-digits", choices=["mlp-digits", "zhu-quartic", "scalar-factorization"])
    p.add_argument("--n", type=int, default=1000, help="mlp-digits: number of training examples")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 64], help="mlp-digits: hidden widths")
    p.add_argument("--seed", type=int, default=0, help="mlp-digits: initialisation seed")
    p.add_argument("--depth", type=int, default=3, help="scalar-factorization: depth")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eig-every", type=int, default=1, help="measure sharpness every this many steps (0: never)")
    p.add_argument("--n-eigs", type=int, default=1, help="how many top Hessian eigenvalues to track")
    p.add_argument("--store-every", type=int, default=1, help="keep every this many iterates")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std per coordinate added after each step")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", default="run.nft", help="trajectory file to write")


def cmd_run_gd(args: argparse.Namespace) -> int:
    from .gd import run_gd

    problem = _problem_from_args(args)
    out = Path(args.out)
    try:
        traj = run_gd(
            problem, args.lr, args.steps, eig_every=args.eig_every, n_eigs=args.n_eigs,
            store_every=args.store_every, progress=True, noise=args.noise, noise_seed=args.noise_seed,
        )
    except DivergenceError as err:
        if err.partial is not None:
            err.partial.save(out)
            print(f"saved the trajectory up to the divergence to {out}", file=sys.stderr)
        raise
    traj.save(out)
    png = out.with_suffix(".png")
    traj.plot().savefig(png, dpi=120)
    s = traj.history["sharpness"][:, 0]
    s = s[s.isfinite()]
    onset = traj.eos_onset
    print(f"problem      {problem.name} ({problem.dim} parameters), lr = {args.lr:g}, {args.steps} steps")
    print(f"final loss   {traj.history['loss'][-1].item():.6g}")
    if len(s):
        print(f"sharpness    {s.min().item():.4g} .. {s.max().item():.4g} (2/lr = {2 / args.lr:.4g}); "
              f"final {s[-1].item():.4g}")
    print(f"EoS onset    {'step ' + str(onset) if onset is not None else 'not reached'}")
    print(f"trajectory   {out}")
    print(f"figure       {png}")
    return 0


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("trajectory", help="trajectory file written by run-gd (.nft)")
    p.add_argument("--flows", default="gradient,modified1,modified2,central",
                   help="comma-separated flow names (gradient, modified1, modified2, principal, central)")
    p.add_argument("--steps", type=int, default=None, help="compare up to this step (default: the whole run)")
    p.add_argument("--out", default=None, help="figure to write (default: the trajectory's name + .compare.png)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from .flows import FLOWS, compare
    from .problems import make
    from .trajectory import Trajectory

    names = _names(args.flows)
    unknown = [n for n in names if n not in FLOWS]
    if unknown or not names:
        raise NeuralflowError(f"unknown flows {unknown or names}; choose from {', '.join(FLOWS)}.")
    traj = Trajectory.load(args.trajectory)
    problem = make(traj.problem)
    flows = [FLOWS[n](problem, traj.lr) for n in names]
    result = compare(traj, *flows, problem=problem, steps=args.steps, progress=True)
    print(result)
    out = Path(args.out) if args.out else Path(args.trajectory).with_suffix(".compare.png")
    result.figure().savefig(out, dpi=120)
    print(f"figure       {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"table        {args.json}")
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("fit", help="fit file written by `neuralflow fit` (.nff)")
    p.add_argument("--figures", default=None,
                   help="folder for the report's figures (default: the fit file's name + .report/)")
    p.add_argument("--markdown", default=None, help="also write the report as Markdown here")


def cmd_report(args: argparse.Namespace) -> int:
    from .checkpoint import load, stored_report

    # The numbers saved with the fit render at once; a fit saved without them is rebuilt and reported.
    report = stored_report(args.fit) or load(args.fit).report()
    print(report)
    directory = Path(args.figures) if args.figures else Path(args.fit).with_suffix(".report")
    for path in report.save_figures(directory):
        print(f"figure       {path}")
    if args.markdown:
        Path(args.markdown).write_text(report.to_markdown())
        print(f"markdown     {args.markdown}")
    return 0


def _add_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("trajectory", help="trajectory file written by run-gd (.nft)")
    p.add_argument("--physics", default="gradient", help="physics flow by name (see neuralflow.flows.FLOWS)")
    p.add_argument("--terms", default="Hg,H2g,D3gg", help="comma-separated correction terms (see corrections.TERMS)")
    p.add_argument("--gated", default="", help="comma-separated terms whose coefficient is gated by state features")
    p.add_argument("--baseline", default="",
                   help="comma-separated gated terms that keep a constant coefficient below the edge of stability "
                        "(their gate is then the coefficient's change at lr S = 2)")
    p.add_argument("--features", default="lr_S_minus_2,lr_S,loss",
                   help="comma-separated state features the gates see (see corrections.FEATURES)")
    p.add_argument("--window", type=int, default=20, help="steps integrated from each window start")
    p.add_argument("--target", default="iterates", choices=["iterates", "smoothed"])
    p.add_argument("--method", default="adjoint", choices=["adjoint", "direct", "regression"])
    p.add_argument("--optimizer", default="auto", choices=["auto", "gauss-newton", "lbfgs", "adam"])
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--solver", default="rk4", help="torchdiffeq method (rk4, dopri5, ...)")
    p.add_argument("--step-size", type=float, default=None, help="fixed-grid substep in steps (default: automatic)")
    p.add_argument("--balance", action="store_true",
                   help="regression: weight points by the inverse local mean of their squared residual")
    p.add_argument("--exclude-transients", action="store_true",
                   help="leave out the stretches past 2/lr where GD does not oscillate yet (Trajectory.eos_transients)")
    p.add_argument("--out", default="fit.nff", help="fit file to write (.nff)")


def cmd_fit(args: argparse.Namespace) -> int:
    from .checkpoint import save
    from .corrections import Hybrid, TermLibrary
    from .fit import fit
    from .flows import FLOWS
    from .problems import make
    from .trajectory import Trajectory

    if args.physics not in FLOWS:
        raise NeuralflowError(f"unknown physics {args.physics!r}; choose from {', '.join(FLOWS)}.")
    traj = Trajectory.load(args.trajectory)
    problem = make(traj.problem)
    terms = _names(args.terms)
    library = TermLibrary(problem, traj.lr, terms, gated=_names(args.gated), features=_names(args.features),
                          baseline=_names(args.baseline))
    model = Hybrid(FLOWS[args.physics](problem, traj.lr), library)
    result = fit(
        model, traj, window=args.window, target=args.target, method=args.method, optimizer=args.optimizer,
        max_iters=args.max_iters, solver=args.solver, step_size=args.step_size, progress=True, balance=args.balance,
        exclude=traj.eos_transients() if args.exclude_transients else (),
    )
    print(f"fit          {args.physics} + [{', '.join(terms)}] on {problem.name} ({problem.dim} parameters), "
          f"lr = {traj.lr:g}, window {args.window} steps, {args.method}")
    for name, value in result.coefficients.items():
        print(f"  {name:<10} {value:+.6g} +- {result.uncertainty[name]:.2g}")
    print(f"error        physics {result.physics_error:.4g} -> hybrid {result.hybrid_error:.4g} "
          f"(validation windows, normalised by the mean squared displacement)")
    print(f"time         {result.timing['total']:.3g} s, {result.n_function_evals} right-hand-side evaluations")
    save(result, args.out)
    print(f"fit file     {args.out}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="neuralflow-demo", help="folder for the demo's files (created if needed)")
    p.add_argument("--fast", action="store_true", help="a shrunken run (seconds, for tests): fewer steps, one fit step")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, fast=args.fast, progress=True)
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "run-gd": (_add_run_gd, cmd_run_gd, "run full-batch GD and record the trajectory"),
    "compare": (_add_compare, cmd_compare, "simulate physics flows from a GD trajectory and compare them with it"),
    "fit": (_add_fit, cmd_fit, "fit a physics flow plus correction terms to a GD trajectory"),
    "report": (_add_report, cmd_report, "print which approximation a saved fit says to revise; save the figures"),
    "demo": (_add_demo, cmd_demo, "the whole loop on the digits MLP at the edge of stability, files in one folder"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neuralflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    try:
        return COMMANDS[args.command][1](args)
    except NeuralflowError as err:
        print(f"neuralflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
