"""Command line: ``neuralflow run-gd | compare | fit | report | sweep | demo`` (also ``python -m neuralflow``).

Each subcommand is a function ``cmd_<name>(args)`` registered in :data:`COMMANDS` with the public
functions whose keywords it exposes. Those options are generated from the functions' signatures
(:mod:`neuralflow.options`): a new keyword of ``run_gd``, ``fit``, ``compare``, ``build_report``, a
problem builder or a flow becomes an option by itself. Every subcommand takes ``--config FILE``
(TOML, a ``[subcommand]`` table; the command line wins) and writes the options it ran with back
beside its results (``run.nft`` -> ``run.nft.toml``), which ``--config`` reads again.

Every output path is checked writable before any computation; Ctrl-C or SIGTERM stops a command with
exit status 130 after ``run-gd`` and ``fit`` have saved what they had (the trajectory so far, the best
fit so far) and said where.
"""

from __future__ import annotations

import argparse
import html
import inspect
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from ._io import check_writable
from ._validate import MAX_PARAMS
from .compare import compare
from .corrections import Hybrid, TermLibrary
from .demo import run_demo
from .errors import DivergenceError, InputError, Interrupted, NeuralflowError
from .fit import FitResult, fit
from .flows import FLOWS, for_run
from .gd import run_gd
from .ladder import Ladder
from .options import (
    Option,
    flows_help,
    options_of,
    parse_flows,
    read_config,
    write_config,
)
from .problems import PROBLEMS, make
from .provenance import __version__, provenance, set_command, write_json
from .report import build_report
from .sweep import coefficient_figure, grid, law_figure, sweep
from .trajectory import Trajectory

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
                raise InputError(f"{self.name}: keyword {opt.name!r} of {owner} clashes with the one of "
                                 f"{self.generated[opt.name].owner}; route one of them in options.ROUTED.")
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
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"TOML file with this command's options in a [{cmd.name}] table (the command line wins)")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bars and no summary")
    p.add_argument("--seed", type=int, default=0, help="random seed: the problem's initialisation in run-gd, "
                   "the fit's validation split and gates in fit, torch's generator everywhere (default: 0)")
    p.add_argument("--dtype", default=None, choices=("float64", "float32"),
                   help="floating dtype (default: the problem builder's float64 in run-gd, the trajectory's "
                        "elsewhere)")
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
        "--problem", default="mlp-digits", metavar="NAME|module:FILE.py:FUNCTION",
        help=f"problem by name ({', '.join(CLI_PROBLEMS)}) or your own: module:path/to/file.py:build, a function "
             "returning (module, (inputs, targets)), checked like problems.from_module (default: mlp-digits)")


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
        raise InputError(f"unknown problem {spec!r}; choose from {', '.join(CLI_PROBLEMS)} or pass "
                         "module:path/to/file.py:build.")
    accepted = inspect.signature(builder).parameters
    kwargs = dict(base)
    for name in cmd.owners["problem"]:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in accepted:
            raise InputError(f"--{name.replace('_', '-')} does not apply to problem {spec!r}; its options are "
                             f"{', '.join(k for k in accepted if k not in base)}.")
        kwargs[name] = value
    kwargs.update({k: getattr(args, k) for k in COMMON if k in accepted and getattr(args, k) is not None})
    if "dtype" in kwargs:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return builder(**kwargs)


# ----------------------------------------------------------------------------------------------- run-gd
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
        say(f"sharpness    {s.min().item():.4g} .. {s.max().item():.4g} (2/lr = {2 / lr:.4g}); "
            f"final {s[-1].item():.4g}")
    say(f"EoS onset    {'step ' + str(onset) if onset is not None else 'not reached'}")
    say(f"trajectory   {out}")
    say(f"figure       {png}")
    return _written_back(cmd, args, out, say)


# ----------------------------------------------------------------------------------------------- compare
def _add_compare(cmd: Command) -> None:
    _add_trajectory(cmd)
    _add(cmd.parser, "--flows", "gradient,modified1,modified2,central",
         f"comma-separated flows, each with its options after a colon: {flows_help(FLOWS)}")
    cmd.add_generated("compare", public_functions("compare")["compare"])
    _add(cmd.parser, "--out", None, "figure to write (default: the trajectory's name + .compare.png)")
    _add(cmd.parser, "--json", None, "also write the table as JSON here")


def _add_trajectory(cmd: Command) -> None:
    """The TRAJECTORY argument, and the limits on what its file may make :func:`_load_trajectory` build."""
    cmd.parser.add_argument("trajectory", nargs="?", default=None, help="trajectory file written by run-gd (.nft)")
    cmd.positional = ("trajectory",)
    _add_max_params(cmd)


def _add_max_params(cmd: Command) -> None:
    """Limits on what a trajectory file may make the loader build (its size, running the user's own code)."""
    _add(cmd.parser, "--max-params", MAX_PARAMS, "refuse to rebuild a problem of more parameters than this from a "
         "file (0: no limit)", type=int)
    _add(cmd.parser, "--allow-code", False, "rebuild a problem from your own Python file (module:FILE.py:FUNCTION) "
         "by running it; without it such a trajectory is refused (default: off)", action="store_true")


def _load_trajectory(args: argparse.Namespace):
    """The trajectory and its problem on ``--device`` in ``--dtype`` (default: as recorded)."""
    traj = Trajectory.load(args.trajectory, device=args.device)
    if args.dtype is not None:
        traj = traj.to(traj.iterates.device, dtype=getattr(torch, args.dtype))
    problem = make(traj.problem, max_params=args.max_params or None, allow_code=args.allow_code, device=args.device,
                   dtype=args.dtype)
    return traj, problem


def cmd_compare(cmd: Command, args: argparse.Namespace) -> int:
    specs = parse_flows(args.flows, FLOWS, "--flows")
    out = check_writable(args.out if args.out else Path(args.trajectory).with_suffix(".compare.png"))
    if args.json:
        check_writable(args.json)
    traj, problem = _load_trajectory(args)
    flows = [for_run(name, problem, traj, **kw) for name, kw in specs]
    result = compare(traj, *flows, problem=problem, **cmd.kwargs("compare", args),
                                               progress=not args.quiet)
    say = _say(args)
    say(str(result))
    result.figure().savefig(out, dpi=120)
    say(f"figure       {out}")
    if args.json:
        write_json(args.json, result.to_dict(), device=problem.device, dtype=problem.dtype)
        say(f"table        {args.json}")
    return _written_back(cmd, args, out, say)


# ----------------------------------------------------------------------------------------------- fit
def _add_fit(cmd: Command) -> None:
    _add_trajectory(cmd)
    _add(cmd.parser, "--physics", "gradient",
         "physics flow with its options after a colon (several, comma-separated, fit one library on each: a "
         f"ladder): {flows_help(FLOWS)}")
    functions = public_functions("fit")
    cmd.add_generated("fit", functions["fit"])
    cmd.add_generated("TermLibrary", functions["TermLibrary"])
    cmd.add_generated("build_report", functions["build_report"])
    _add(cmd.parser, "--exclude-transients", False, "leave out the stretches past 2/lr where GD does not oscillate "
         "yet (Trajectory.eos_transients), besides --exclude", action="store_true")
    _add(cmd.parser, "--out", "fit.nff", "fit file to write (.nff); a ladder writes one per physics, NAME.PHYSICS.nff")


def cmd_fit(cmd: Command, args: argparse.Namespace) -> int:
    specs = parse_flows(args.physics, FLOWS, "--physics")
    fit_kw = cmd.kwargs("fit", args)
    if fit_kw["resume"] is not None and len(specs) > 1:
        raise InputError("--resume continues one fit; a ladder of several --physics fits one at a time.")
    out = Path(args.out)
    outs = [out] if len(specs) == 1 else [out.with_suffix(f".{name}{out.suffix}") for name, _ in specs]
    for path in [*outs, *([fit_kw["resume"]] if fit_kw["resume"] is not None else [])]:
        check_writable(path)
    traj, problem = _load_trajectory(args)
    if args.exclude_transients:
        fit_kw["exclude"] = [*fit_kw["exclude"], *traj.eos_transients()]
    library_kw = cmd.kwargs("TermLibrary", args)
    report_kw = cmd.kwargs("build_report", args)
    say = _say(args)
    results, reports = [], []
    for (name, flow_kw), path in zip(specs, outs, strict=True):
        physics = for_run(name, problem, traj, **flow_kw)
        model = Hybrid(physics, TermLibrary(problem, traj.lr, **library_kw))
        try:
            result = fit(model, traj, **fit_kw, progress=not args.quiet)
        except Interrupted as err:
            assert isinstance(err.partial, FitResult)  # fit's Interrupted carries the best fit so far
            checkpoint.save(err.partial, path)
            print(f"saved the best fit so far ({err.partial.settings['interrupted_after']} iterations) to {path}",
                  file=sys.stderr)
            raise
        say(f"fit          {name} + [{', '.join(library_kw['terms'])}] on {problem.name} ({problem.dim} parameters), "
            f"lr = {traj.lr:g}, window {fit_kw['window']} steps, {fit_kw['method']}")
        for term, value in result.coefficients.items():
            say(f"  {term:<10} {value:+.6g} +- {result.uncertainty[term]:.2g}")
        say(f"error        physics {result.physics_error:.4g} -> hybrid {result.hybrid_error:.4g} "
            f"(validation windows, normalised by the mean squared displacement)")
        say(f"time         {result.timing['total']:.3g} s, {result.n_function_evals} right-hand-side evaluations")
        report = result.report(**report_kw)
        result.save(path, report=report)
        say(f"fit file     {path}")
        results.append(result)
        reports.append(report)
    if len(specs) > 1:
        say(str(Ladder(reports, results)))
    return _written_back(cmd, args, out, say)


# ----------------------------------------------------------------------------------------------- report
def _add_report(cmd: Command) -> None:
    cmd.parser.add_argument("fit", nargs="?", default=None, help="fit file written by `neuralflow fit` (.nff)")
    cmd.positional = ("fit",)
    cmd.add_generated("build_report", public_functions("report")["build_report"])
    _add(cmd.parser, "--figures", None, "folder for the report's figures (default: the fit file's name + .report/)")
    _add(cmd.parser, "--figure-format", "png", "format of the figures (png, pdf, svg)")
    _add(cmd.parser, "--markdown", None, "also write the report as Markdown here")
    _add(cmd.parser, "--latex", None, "also write the report as LaTeX here")
    _add(cmd.parser, "--html", None, "also write the report as an HTML page here")
    _add(cmd.parser, "--json", None, "also write every number of the report as JSON here (Report.from_dict reads it)")
    _add_max_params(cmd)


def cmd_report(cmd: Command, args: argparse.Namespace) -> int:
    if args.dtype is not None:
        raise InputError("report renders a saved fit in the precision it was fitted in; --dtype does not apply.")
    directory = check_writable(Path(args.figures) if args.figures else Path(args.fit).with_suffix(".report"),
                               folder=True)
    for what in ("markdown", "latex", "html", "json"):
        if getattr(args, what):
            check_writable(getattr(args, what))
    options = cmd.kwargs("build_report", args)
    changed = [k for k, v in options.items() if cmd.generated[k].text(v) != cmd.generated[k].text(
        cmd.generated[k].default)]
    # The numbers saved with the fit render at once; other options, or a fit saved without them, rebuild it.
    stored = None if changed else checkpoint.stored_report(args.fit)
    if stored is None:
        fitted = checkpoint.load(args.fit, device=args.device, max_params=args.max_params or None,
                                 allow_code=args.allow_code)
        report = fitted.report(**{k: options[k] for k in changed})
    else:
        report = stored
    say = _say(args)
    say(str(report))
    for path in report.save_figures(directory, fmt=args.figure_format):
        say(f"figure       {path}")
    renders = {
        "markdown": report.to_markdown,
        "latex": report.to_latex,
        "html": lambda: f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(report.title())}"
                        f"</title></head><body>{report._repr_html_()}</body></html>\n",
        "json": lambda: json.dumps({**report.to_dict(), "provenance": provenance(args.device, args.dtype)},
                                   indent=2),
    }
    for what, render in renders.items():
        target = getattr(args, what)
        if target:
            Path(target).write_text(render())
            say(f"{what:<12} {target}")
    return _written_back(cmd, args, Path(args.fit).with_suffix(".report.toml"), say)


# ----------------------------------------------------------------------------------------------- demo
def _add_demo(cmd: Command) -> None:
    cmd.add_generated("run_demo", public_functions("demo")["run_demo"])


def cmd_demo(cmd: Command, args: argparse.Namespace) -> int:
    if args.dtype is not None or args.device is not None:
        raise InputError("the demo runs its built-in default in float64 on the CPU; run-gd, compare and fit take "
                         "--dtype and --device.")
    check_writable(args.out, folder=True)
    run_demo(**cmd.kwargs("run_demo", args), progress=not args.quiet, quiet=args.quiet)
    return 0


# ----------------------------------------------------------------------------------------------- sweep
def _add_sweep(cmd: Command) -> None:
    cmd.parser.add_argument("spec", nargs="?", default=None, metavar="SPEC",
                            help='JSON file: a list of run configurations, {"runs": [...]}, or {"base": {...}, '
                                 '"grid": {"lr": [...], "problem.seed": [...]}} (see neuralflow.sweep)')
    cmd.positional = ("spec",)
    _add(cmd.parser, "--out", "sweep", "results folder (created; a finished run in it is not run again)")
    _add(cmd.parser, "--engine", "local", "where the runs go: local (process pool) or ray")
    _add(cmd.parser, "--workers", None, "local engine: worker processes (default: CPU count)", type=int)
    _add(cmd.parser, "--address", None, "ray engine: head address host:port (default: ray.init())")
    _add(cmd.parser, "--threads", 1, "torch threads per run", type=int)


def cmd_sweep(cmd: Command, args: argparse.Namespace) -> int:
    if args.dtype is not None or args.device is not None:
        raise InputError("a sweep's runs take their dtype and device from the configurations (keys 'device' and "
                         "'problem.dtype'); --dtype and --device do not apply.")
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
    table = sweep(configs, out=args.out, engine=args.engine, workers=args.workers, address=args.address,
                  threads=args.threads, progress=not args.quiet)
    say = _say(args)
    shown = [c for c in ("lr", "problem.seed", "status", "eos_onset", "plateau_ratio", "quiet_steps", "wall_s")
             if c in table]
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


COMMANDS: dict[str, tuple[Callable[[Command], None], Callable[[Command, argparse.Namespace], int], str]] = {
    "run-gd": (_add_run_gd, cmd_run_gd, "run full-batch GD and record the trajectory"),
    "compare": (_add_compare, cmd_compare, "simulate physics flows from a GD trajectory and compare them with it"),
    "fit": (_add_fit, cmd_fit, "fit a physics flow plus correction terms to a GD trajectory"),
    "report": (_add_report, cmd_report, "print which approximation a saved fit says to revise; save the figures"),
    "sweep": (_add_sweep, cmd_sweep, "run a grid of GD runs (fits, comparisons) as independent tasks; one table"),
    "demo": (_add_demo, cmd_demo, "the whole loop on the digits MLP at the edge of stability, files in one folder"),
}


# ----------------------------------------------------------------------------------------------- machinery
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
        print(f"neuralflow {args.command}: interrupted. {err if isinstance(err, Interrupted) else ''}".rstrip(),
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        set_command(None)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a command as Ctrl-C does, so that it saves what it has."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
