"""Command line: ``neuralflow run-gd | compare | fit | report | sweep | demo`` (also ``python -m neuralflow``).

The subcommands by name (:data:`COMMANDS`), the parser built from them, ``--config`` files as its
defaults, and :func:`main`, which runs one subcommand and turns errors and interruptions into exit
statuses.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

import torch

from ..errors import InputError, Interrupted, NeuralflowError
from ..options import read_config
from ..provenance import __version__, set_command
from .batch import _add_demo, _add_sweep, cmd_demo, cmd_sweep
from .command import Command, _add_common
from .fits import _add_fit, _add_report, cmd_fit, cmd_report
from .runs import _add_compare, _add_run_gd, cmd_compare, cmd_run_gd

COMMANDS: dict[str, tuple[Callable[[Command], None], Callable[[Command, argparse.Namespace], int], str]] = {
    "run-gd": (_add_run_gd, cmd_run_gd, "run full-batch GD and record the trajectory"),
    "compare": (_add_compare, cmd_compare, "simulate physics flows from a GD trajectory and compare them with it"),
    "fit": (_add_fit, cmd_fit, "fit a physics flow plus correction terms to a GD trajectory"),
    "report": (_add_report, cmd_report, "print which approximation a saved fit says to revise; save the figures"),
    "sweep": (_add_sweep, cmd_sweep, "run a grid of GD runs (fits, comparisons) as independent tasks; one table"),
    "demo": (_add_demo, cmd_demo, "the whole loop on the digits MLP at the edge of stability, files in one folder"),
}


def _apply_config(cmd: Command, path: str) -> None:
    """Make the config file's ``[command]`` table (and its top-level keys) the parser's defaults."""
    data = read_config(path)
    table = {k: v for k, v in data.items() if not isinstance(v, dict)}
    section = data.get(cmd.name, {})
    if not isinstance(section, dict):
        raise InputError(f"--config {path}: {cmd.name} must be a table ([{cmd.name}]).")
    table.update(section)
    actions = {a.dest: a for a in cmd.parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise InputError(f"--config {path}: {cmd.name} has no option {key!r}; see neuralflow {cmd.name} --help.")
        opt, convert = cmd.generated.get(dest), actions[dest].type
        if opt is not None:
            defaults[dest] = opt.coerce(value)
        elif callable(convert) and isinstance(value, str):
            defaults[dest] = convert(value)
        else:
            defaults[dest] = value
    cmd.parser.set_defaults(**defaults)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser and its subcommands (generated from the public functions' signatures)."""
    parser = argparse.ArgumentParser(prog="neuralflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"neuralflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, (add, _, help_) in COMMANDS.items():
        cmd = Command(name, sub.add_parser(name, help=help_, description=help_))
        add(cmd)
        _add_common(cmd)
        commands[name] = cmd
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    cmd = commands[args.command]
    import matplotlib

    matplotlib.use("Agg")
    set_command(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.config:
            _apply_config(cmd, args.config)
            args = parser.parse_args(argv)
        missing = [p for p in cmd.positional if getattr(args, p) is None]
        missing += [o.flag for o in cmd.generated.values() if o.required and getattr(args, o.name) is None]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (on the command line or in the --config file).")

        torch.manual_seed(args.seed)
        return COMMANDS[args.command][1](cmd, args)
    except NeuralflowError as err:
        print(f"neuralflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(
            f"neuralflow {args.command}: interrupted. {err if isinstance(err, Interrupted) else ''}".rstrip(),
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        set_command(None)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a command as Ctrl-C does, so that it saves what it has."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
