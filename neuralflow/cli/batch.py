"""The subcommands ``demo`` (the whole loop in one folder) and ``sweep`` (a grid of runs, one table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._io import check_writable
from ..demo import run_demo
from ..errors import InputError, NeuralflowError
from ..sweep import coefficient_figure, grid, law_figure, sweep
from .command import Command, _add, _say, public_functions


def _add_demo(cmd: Command) -> None:
    cmd.add_generated("run_demo", public_functions("demo")["run_demo"])


def cmd_demo(cmd: Command, args: argparse.Namespace) -> int:
    if args.dtype is not None or args.device is not None:
        raise InputError(
            "the demo runs its built-in default in float64 on the CPU; run-gd, compare and fit take "
            "--dtype and --device."
        )
    check_writable(args.out, folder=True)
    run_demo(**cmd.kwargs("run_demo", args), progress=not args.quiet, quiet=args.quiet)
    return 0


def _add_sweep(cmd: Command) -> None:
    cmd.parser.add_argument(
        "spec",
        nargs="?",
        default=None,
        metavar="SPEC",
        help='JSON file: a list of run configurations, {"runs": [...]}, or {"base": {...}, '
        '"grid": {"lr": [...], "problem.seed": [...]}} (see neuralflow.sweep)',
    )
    cmd.positional = ("spec",)
    _add(cmd.parser, "--out", "sweep", "results folder (created; a finished run in it is not run again)")
    _add(cmd.parser, "--engine", "local", "where the runs go: local (process pool) or ray")
    _add(cmd.parser, "--workers", None, "local engine: worker processes (default: CPU count)", type=int)
    _add(cmd.parser, "--address", None, "ray engine: head address host:port (default: ray.init())")
    _add(cmd.parser, "--threads", 1, "torch threads per run", type=int)


def cmd_sweep(cmd: Command, args: argparse.Namespace) -> int:
    if args.dtype is not None or args.device is not None:
        raise InputError(
            "a sweep's runs take their dtype and device from the configurations (keys 'device' and "
            "'problem.dtype'); --dtype and --device do not apply."
        )
    check_writable(args.out, folder=True)
    try:
        spec = json.loads(Path(args.spec).read_text())
    except (OSError, ValueError) as err:
        raise NeuralflowError(f"cannot read the sweep configuration {args.spec}: {err}") from None
    configs: Any  # parsed JSON; sweep() checks what it holds
    if isinstance(spec, dict) and "grid" in spec:
        configs = grid(spec.get("base", {}), spec["grid"])
    else:
        configs = spec.get("runs") if isinstance(spec, dict) else spec
    table = sweep(
        configs,
        out=args.out,
        engine=args.engine,
        workers=args.workers,
        address=args.address,
        threads=args.threads,
        progress=not args.quiet,
    )
    say = _say(args)
    shown = [
        c for c in ("lr", "problem.seed", "status", "eos_onset", "plateau_ratio", "quiet_steps", "wall_s") if c in table
    ]
    shown += [c for c in table.columns if c.startswith(("coef.", "distance."))]
    say(table[shown].to_string(index=False))
    out = Path(args.out)
    figures = {"law": law_figure(table)}
    figures.update({f"coef_{c[5:]}": coefficient_figure(table, c[5:]) for c in table.columns if c.startswith("coef.")})
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=120)
        say(f"figure       {out / (name + '.png')}")
    say(f"table        {out / 'table.csv'} ({len(table)} runs)")
    return 0
