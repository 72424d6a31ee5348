"""The subcommands ``fit`` (a physics flow plus correction terms, one or a ladder) and ``report``."""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from .. import checkpoint
from .._io import check_writable
from ..corrections import Hybrid, TermLibrary
from ..errors import InputError, Interrupted
from ..fit import FitResult, fit
from ..flows import FLOWS, for_run
from ..ladder import Ladder
from ..options import flows_help, parse_flows
from ..provenance import provenance
from .command import (
    Command,
    _add,
    _add_max_params,
    _add_trajectory,
    _load_trajectory,
    _say,
    _written_back,
    public_functions,
)


def _add_fit(cmd: Command) -> None:
    _add_trajectory(cmd)
    _add(
        cmd.parser,
        "--physics",
        "gradient",
        "physics flow with its options after a colon (several, comma-separated, fit one library on each: a "
        f"ladder): {flows_help(FLOWS)}",
    )
    functions = public_functions("fit")
    cmd.add_generated("fit", functions["fit"])
    cmd.add_generated("TermLibrary", functions["TermLibrary"])
    cmd.add_generated("build_report", functions["build_report"])
    _add(
        cmd.parser,
        "--exclude-transients",
        False,
        "leave out the stretches past 2/lr where GD does not oscillate "
        "yet (Trajectory.eos_transients), besides --exclude",
        action="store_true",
    )
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
            print(
                f"saved the best fit so far ({err.partial.settings['interrupted_after']} iterations) to {path}",
                file=sys.stderr,
            )
            raise
        say(
            f"fit          {name} + [{', '.join(library_kw['terms'])}] on {problem.name} ({problem.dim} parameters), "
            f"lr = {traj.lr:g}, window {fit_kw['window']} steps, {fit_kw['method']}"
        )
        for term, value in result.coefficients.items():
            say(f"  {term:<10} {value:+.6g} +- {result.uncertainty[term]:.2g}")
        say(
            f"error        physics {result.physics_error:.4g} -> hybrid {result.hybrid_error:.4g} "
            f"(validation windows, normalised by the mean squared displacement)"
        )
        say(f"time         {result.timing['total']:.3g} s, {result.n_function_evals} right-hand-side evaluations")
        report = result.report(**report_kw)
        result.save(path, report=report)
        say(f"fit file     {path}")
        results.append(result)
        reports.append(report)
    if len(specs) > 1:
        say(str(Ladder(reports, results)))
    return _written_back(cmd, args, out, say)


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
    directory = check_writable(
        Path(args.figures) if args.figures else Path(args.fit).with_suffix(".report"), folder=True
    )
    for what in ("markdown", "latex", "html", "json"):
        if getattr(args, what):
            check_writable(getattr(args, what))
    options = cmd.kwargs("build_report", args)
    changed = [
        k for k, v in options.items() if cmd.generated[k].text(v) != cmd.generated[k].text(cmd.generated[k].default)
    ]
    # The numbers saved with the fit render at once; other options, or a fit saved without them, rebuild it.
    stored = None if changed else checkpoint.stored_report(args.fit)
    if stored is None:
        fitted = checkpoint.load(
            args.fit, device=args.device, max_params=args.max_params or None, allow_code=args.allow_code
        )
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
        "html": lambda: (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(report.title())}'
            f"</title></head><body>{report._repr_html_()}</body></html>\n"
        ),
        "json": lambda: json.dumps({**report.to_dict(), "provenance": provenance(args.device, args.dtype)}, indent=2),
    }
    for what, render in renders.items():
        target = getattr(args, what)
        if target:
            Path(target).write_text(render())
            say(f"{what:<12} {target}")
    return _written_back(cmd, args, Path(args.fit).with_suffix(".report.toml"), say)
