"""Provenance: what produced a file or a benchmark result, as one flat dict of strings and ints.

:func:`provenance` is the one helper every writer uses (``_io.write`` for trajectories and fits,
the command line's config files, the benchmarks' JSON). It records the command line (or, outside
the command line, the calling script and function), the package's git commit when it runs from a
checkout (``-dirty`` with uncommitted changes; ``"unknown"`` otherwise, never an error), the
versions of Python, torch, numpy, torchdiffeq and scikit-learn, and the device, dtype and thread
count of the computation.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "set_command", "write_json", "__version__"]

__version__ = "0.1.0"

_PACKAGE_DIR = Path(__file__).resolve().parent
_command: list[str] | None = None


def set_command(argv: list[str] | None) -> None:
    """Record the command line being run (the CLI calls this; ``None`` forgets it)."""
    global _command
    _command = None if argv is None else ["neuralflow", *argv]


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes) or ``"unknown"``; never raises."""
    root = _PACKAGE_DIR.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _caller() -> str:
    """``file.py:function`` of the first frame outside neuralflow (file name only, no folders)."""
    for frame in inspect.stack(context=0)[2:]:
        path = Path(frame.filename)
        if _PACKAGE_DIR not in path.resolve().parents and not path.name.startswith("<frozen"):
            return f"{path.name}:{frame.function}"
    return "unknown"


def provenance(device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """What produced a result: a flat dict of strings and ints (see the module docstring).

    ``command`` is the ``neuralflow ...`` command line when the command line runs, else the script's
    own arguments (script name without folders); ``caller`` the calling ``file.py:function``.
    """
    argv = _command or [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return {
        "command": shlex.join(argv),
        "caller": "cli" if _command else _caller(),
        "neuralflow": __version__,
        "commit": commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "torchdiffeq": _version("torchdiffeq"),
        "scikit-learn": _version("scikit-learn"),
        "device": str(device) if device is not None else "cpu",
        "dtype": str(torch.get_default_dtype() if dtype is None else dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def write_json(
    path: str | os.PathLike,
    data: dict[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    indent: int = 2,
) -> Path:
    """Write ``data`` as JSON with its :func:`provenance` under ``"provenance"`` (the benchmarks' and CLI's JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "provenance": provenance(device, dtype)}, indent=indent, default=str))
    return path
