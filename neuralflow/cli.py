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
    p.add_argument("--out", default="run.nft", help="trajectory file to write")


def cmd_run_gd(args: argparse.Namespace) -> int:
    from .gd import run_gd

    problem = _problem_from_args(args)
    out = Path(args.out)
    try:
        traj = run_gd(
            problem, args.lr, args.steps, eig_every=args.eig_every, n_eigs=args.n_eigs,
            store_every=args.store_every, progress=True,
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


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "run-gd": (_add_run_gd, cmd_run_gd, "run full-batch GD and record the trajectory"),
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
