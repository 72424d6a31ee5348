"""What every subcommand shares: :class:`Command` (its options, generated from the public functions'
signatures, and its parser), the common options, the problem options and the trajectory argument,
and writing a run's options back beside its result.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._validate import MAX_PARAMS
from ..compare import compare
from ..corrections import TermLibrary
from ..demo import run_demo
from ..errors import InputError
from ..fit import fit
from ..gd import run_gd
from ..options import Option, options_of, write_config
from ..problems import PROBLEMS, make
from ..provenance import provenance
from ..report import build_report
from ..trajectory import Trajectory

#: Command-line defaults for keywords the Python function requires (it has no default).
CLI_DEFAULTS: dict[str, Any] = {"run_gd.lr": 0.1, "run_gd.steps": 3000}


#: Keywords every subcommand takes (routed to any function that has them), and the config file.
COMMON = ("seed", "dtype", "device")


#: Problems the command line builds by name (``quadratic`` needs a matrix: Python only).
CLI_PROBLEMS = ("mlp-digits", "cnn-digits", "lstm-recall", "zhu-quartic", "scalar-factorization")


def public_functions(command: str) -> dict[str, Any]:
    """The public functions whose keywords ``command`` exposes, by owner name (what the options test walks)."""
    by_command: dict[str, dict[str, Any]] = {
        "run-gd": {"run_gd": run_gd},
        "compare": {"compare": compare},
        "fit": {"fit": fit, "TermLibrary": TermLibrary, "build_report": build_report},
        "report": {"build_report": build_report},
        "demo": {"run_demo": run_demo},
    }
    return by_command[command]


def problem_builders() -> dict[str, Any]:
    """The problem builders the command line reaches: by name, and ``from_file`` for ``--problem module:...``."""
    return {**{name: PROBLEMS[name] for name in CLI_PROBLEMS}, "module": PROBLEMS["module"]}


@dataclass
class Command:
    """A subcommand: its options by destination (generated and its own) and the parser."""

    name: str
    parser: argparse.ArgumentParser
    generated: dict[str, Option] = field(default_factory=dict)
    owners: dict[str, list[str]] = field(default_factory=dict)  # owner -> its option names
    functions: dict[str, Any] = field(default_factory=dict)  # owner -> the function
    positional: tuple[str, ...] = ()

    def add_generated(self, owner: str, fn: Any, skip: tuple[str, ...] = ()) -> None:
        names = []
        for opt in options_of(fn, owner, skip=skip + COMMON):
            if opt.name in self.generated:
                raise InputError(
                    f"{self.name}: keyword {opt.name!r} of {owner} clashes with the one of "
                    f"{self.generated[opt.name].owner}; route one of them in options.ROUTED."
                )
            key = f"{owner}.{opt.name}"
            default = CLI_DEFAULTS.get(key, opt.default)
            opt.add_to(self.parser, default)
            self.generated[opt.name] = opt
            names.append(opt.name)
        self.owners[owner] = names
        self.functions[owner] = fn

    def kwargs(self, owner: str, args: argparse.Namespace) -> dict[str, Any]:
        """The keywords for ``owner`` from the parsed options, the common ones (``--seed``, ...) where it takes them."""
        out = {name: getattr(args, name) for name in self.owners[owner]}
        accepted = inspect.signature(self.functions[owner]).parameters
        out.update({k: getattr(args, k) for k in COMMON if k in accepted and getattr(args, k) is not None})
        return out


def _add(parser: argparse.ArgumentParser, flag: str, default: Any, help_: str, **kw: Any) -> None:
    """A subcommand's own option (not a keyword of a public function), its default in the help."""
    if kw.get("action") != "store_true" and "default:" not in help_:
        help_ = f"{help_} (default: {'none' if default is None else default})"
    parser.add_argument(flag, default=default, help=help_, **kw)


def _add_common(cmd: Command) -> None:
    p = cmd.parser
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"TOML file with this command's options in a [{cmd.name}] table (the command line wins)",
    )
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bars and no summary")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed: the problem's initialisation in run-gd, "
        "the fit's validation split and gates in fit, torch's generator everywhere (default: 0)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float64", "float32"),
        help="floating dtype (default: the problem builder's float64 in run-gd, the trajectory's elsewhere)",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")


def _problem_options(cmd: Command) -> None:
    """One option per keyword of any problem builder; each passes only to the builders that take it."""
    builders = problem_builders()
    seen: dict[str, Option] = {}
    defaults: dict[str, list[str]] = {}
    for name, fn in builders.items():
        for opt in options_of(fn, fn.__name__, skip=COMMON):
            if opt.name in seen and seen[opt.name].kind != opt.kind:
                raise InputError(f"problem builders disagree on the type of {opt.name!r}.")
            seen.setdefault(opt.name, opt)
            defaults.setdefault(opt.name, []).append(f"{name} {opt.shown(opt.default)}")
    for name, opt in seen.items():
        opt.add_to(cmd.parser, None, f"per problem, {'; '.join(defaults[name])}")
        cmd.generated[name] = opt
    cmd.owners["problem"] = list(seen)
    cmd.parser.add_argument(
        "--problem",
        default="mlp-digits",
        metavar="NAME|module:FILE.py:FUNCTION",
        help=f"problem by name ({', '.join(CLI_PROBLEMS)}) or your own: module:path/to/file.py:build, a function "
        "returning (module, (inputs, targets)), checked like problems.from_module (default: mlp-digits)",
    )


def _problem_from_args(cmd: Command, args: argparse.Namespace):
    builders = problem_builders()
    spec = args.problem
    if spec.startswith("module:"):
        path, sep, function = spec.removeprefix("module:").rpartition(":")
        if not sep or not function.isidentifier():
            path, function = spec.removeprefix("module:"), "build"
        builder, base = builders["module"], {"path": path, "function": function}
    elif spec in builders and spec != "module":
        builder, base = builders[spec], {}
    else:
        raise InputError(
            f"unknown problem {spec!r}; choose from {', '.join(CLI_PROBLEMS)} or pass module:path/to/file.py:build."
        )
    accepted = inspect.signature(builder).parameters
    kwargs = dict(base)
    for name in cmd.owners["problem"]:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            raise InputError(
                f"--{name.replace('_', '-')} does not apply to problem {spec!r}; its options are "
                f"{', '.join(k for k in accepted if k not in base)}."
            )
        kwargs[name] = value
    kwargs.update({k: getattr(args, k) for k in COMMON if k in accepted and getattr(args, k) is not None})
    if "dtype" in kwargs:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return builder(**kwargs)


def _add_trajectory(cmd: Command) -> None:
    """The TRAJECTORY argument, and the limits on what its file may make :func:`_load_trajectory` build."""
    cmd.parser.add_argument("trajectory", nargs="?", default=None, help="trajectory file written by run-gd (.nft)")
    cmd.positional = ("trajectory",)
    _add_max_params(cmd)


def _add_max_params(cmd: Command) -> None:
    """Limits on what a trajectory file may make the loader build (its size, running the user's own code)."""
    _add(
        cmd.parser,
        "--max-params",
        MAX_PARAMS,
        "refuse to rebuild a problem of more parameters than this from a file (0: no limit)",
        type=int,
    )
    _add(
        cmd.parser,
        "--allow-code",
        False,
        "rebuild a problem from your own Python file (module:FILE.py:FUNCTION) "
        "by running it; without it such a trajectory is refused (default: off)",
        action="store_true",
    )


def _load_trajectory(args: argparse.Namespace):
    """The trajectory and its problem on ``--device`` in ``--dtype`` (default: as recorded)."""
    traj = Trajectory.load(args.trajectory, device=args.device)
    if args.dtype is not None:
        traj = traj.to(traj.iterates.device, dtype=getattr(torch, args.dtype))
    problem = make(
        traj.problem,
        max_params=args.max_params or None,
        allow_code=args.allow_code,
        device=args.device,
        dtype=args.dtype,
    )
    return traj, problem


def _say(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda text: None) if args.quiet else print


def _values(cmd: Command, args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the run as a config file holds it."""
    skip = {"help", "config", "command"}
    out = {}
    for action in cmd.parser._actions:
        if action.dest in skip:
            continue
        value = getattr(args, action.dest)
        opt = cmd.generated.get(action.dest)
        out[action.dest] = opt.text(value) if opt is not None else value
    return out


def _written_back(cmd: Command, args: argparse.Namespace, beside: Path, say: Callable[[str], None]) -> int:
    """Write the run's options as TOML beside its result (``run.nft`` -> ``run.nft.toml``)."""
    path = beside if beside.suffix == ".toml" else beside.with_name(beside.name + ".toml")
    prov = provenance(device=args.device, dtype=args.dtype)
    comments = {k: prov[k] for k in ("command", "neuralflow", "commit")}
    comments["rerun"] = f"neuralflow {cmd.name} --config {path.name}"
    write_config(path, cmd.name, _values(cmd, args), comments)
    say(f"config       {path}")
    return 0
