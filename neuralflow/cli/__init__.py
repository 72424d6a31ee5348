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

from .batch import cmd_demo, cmd_sweep
from .command import CLI_DEFAULTS, CLI_PROBLEMS, COMMON, Command, problem_builders, public_functions
from .fits import cmd_fit, cmd_report
from .parser import COMMANDS, build_parser, main
from .runs import cmd_compare, cmd_run_gd

__all__ = [
    "main",
    "build_parser",
    "COMMANDS",
    "Command",
    "CLI_DEFAULTS",
    "COMMON",
    "CLI_PROBLEMS",
    "public_functions",
    "problem_builders",
    "cmd_run_gd",
    "cmd_compare",
    "cmd_fit",
    "cmd_report",
    "cmd_demo",
    "cmd_sweep",
]
