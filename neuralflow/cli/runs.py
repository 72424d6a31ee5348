"""The subcommands ``run-gd`` (run GD, save the trajectory) and ``compare`` (physics flows against it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._io import check_writable
from ..compare import compare
from ..errors import DivergenceError, Interrupted
from ..flows import FLOWS, for_run
from ..gd import run_gd
from ..options import flows_help, parse_flows
from ..provenance import write_json
from ..trajectory import Trajectory
from .command import (
    Command,
    _add,
    _add_trajectory,
    _load_trajectory,
    _problem_from_args,
    _problem_options,
    _say,
    _written_back,
    public_functions,
)


def _add_run_gd(cmd: Command) -> None:
    _problem_options(cmd)
    cmd.add_generated("run_gd", public_functions("run-gd")["run_gd"])
    _add(cmd.parser, "--out", "run.nft", "trajectory file to write")


def cmd_run_gd(cmd: Command, args: argparse.Namespace) -> int:
    out = check_writable(args.out)
    png = check_writable(out.with_suffix(".png"))
    kwargs = cmd.kwargs("run_gd", args)
    if kwargs["resume"] is not None:
        check_writable(kwargs["resume"])
    problem = _problem_from_args(cmd, args)
    try:
        traj = run_gd(problem, **kwargs, progress=not args.quiet)
    except (DivergenceError, Interrupted) as err:
        if isinstance(err.partial, Trajectory):
            err.partial.save(out)
            print(f"saved the trajectory so far (up to step {int(err.partial.steps[-1])}) to {out}", file=sys.stderr)
        raise
    traj.save(out)
    traj.plot().savefig(png, dpi=120)
    s = traj.history["sharpness"][:, 0]
    s = s[s.isfinite()]
    onset = traj.eos_onset
    lr = kwargs["lr"]
    say = _say(args)
    say(f"problem      {problem.name} ({problem.dim} parameters), lr = {lr:g}, {kwargs['steps']} steps")
    say(f"final loss   {traj.history['loss'][-1].item():.6g}")
    if len(s):
        say(
            f"sharpness    {s.min().item():.4g} .. {s.max().item():.4g} (2/lr = {2 / lr:.4g}); final {s[-1].item():.4g}"
        )
    say(f"EoS onset    {'step ' + str(onset) if onset is not None else 'not reached'}")
    say(f"trajectory   {out}")
    say(f"figure       {png}")
    return _written_back(cmd, args, out, say)


def _add_compare(cmd: Command) -> None:
    _add_trajectory(cmd)
    _add(
        cmd.parser,
        "--flows",
        "gradient,modified1,modified2,central",
        f"comma-separated flows, each with its options after a colon: {flows_help(FLOWS)}",
    )
    cmd.add_generated("compare", public_functions("compare")["compare"])
    _add(cmd.parser, "--out", None, "figure to write (default: the trajectory's name + .compare.png)")
    _add(cmd.parser, "--json", None, "also write the table as JSON here")


def cmd_compare(cmd: Command, args: argparse.Namespace) -> int:
    specs = parse_flows(args.flows, FLOWS, "--flows")
    out = check_writable(args.out if args.out else Path(args.trajectory).with_suffix(".compare.png"))
    if args.json:
        check_writable(args.json)
    traj, problem = _load_trajectory(args)
    flows = [for_run(name, problem, traj, **kw) for name, kw in specs]
    result = compare(traj, *flows, problem=problem, **cmd.kwargs("compare", args), progress=not args.quiet)
    say = _say(args)
    say(str(result))
    result.figure().savefig(out, dpi=120)
    say(f"figure       {out}")
    if args.json:
        write_json(args.json, result.to_dict(), device=problem.device, dtype=problem.dtype)
        say(f"table        {args.json}")
    return _written_back(cmd, args, out, say)
