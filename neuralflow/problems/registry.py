"""Problems by name: :data:`PROBLEMS`, :func:`make` (rebuild one from its saved description) and
:func:`from_file` (a problem from the user's own Python file).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._validate import DTYPES, MAX_PARAMS, check_max_params, check_problem_description
from ..errors import InputError
from .core import Problem, from_module, quadratic
from .digits import cnn_digits, mlp_digits
from .toys import lstm_recall, scalar_factorization, zhu_quartic


def from_file(
    path: str | os.PathLike,
    function: str = "build",
    loss: str = "mse",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> Problem:
    """A problem from a Python file defining ``function() -> (module, (inputs, targets))``, through :func:`from_module`.

    What the command line's ``--problem module:path/to/file.py:build`` calls. The file is run as a
    module (it may import anything); ``function`` takes no arguments and returns the module and its
    data, either as ``(module, (inputs, targets))`` or ``(module, inputs, targets)``. The module is
    cast to ``dtype`` (default: as built) and moved to ``device``; the data follow it. Then every check
    of :func:`from_module` applies. The description records the file's absolute path and the
    function, so :func:`make` rebuilds the problem from a trajectory (the file must still be there).
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise InputError(f"from_file: {path} is not a Python file; pass module:path/to/file.py:function.")
    spec = importlib.util.spec_from_file_location(f"neuralflow_user_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise InputError(f"from_file: Python cannot load {file} as a module.")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build = getattr(mod, function, None)
    if not callable(build):
        raise InputError(
            f"from_file: {file} defines no function {function!r}; define {function}() returning "
            "(module, (inputs, targets))."
        )
    built = build()
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], (tuple, list)) and len(built[1]) == 2:
        built = (built[0], *built[1])
    if not (isinstance(built, tuple) and len(built) == 3 and isinstance(built[0], torch.nn.Module)):
        raise InputError(
            f"from_file: {file}:{function}() must return (module, (inputs, targets)) with a "
            f"torch.nn.Module, got {type(built).__name__}."
        )
    module, inputs, targets = built
    module = module.to(device=device, dtype=dtype)
    problem = from_module(module, inputs, targets, loss=loss, batch_size=batch_size)
    problem.name = "module"
    problem.description = {
        "name": "module",
        "path": str(file),
        "function": function,
        "loss": loss,
        "batch_size": batch_size,
        "dtype": str(problem.dtype).removeprefix("torch."),
    }
    return problem


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "quadratic": quadratic,
    "zhu-quartic": zhu_quartic,
    "scalar-factorization": scalar_factorization,
    "mlp-digits": mlp_digits,
    "cnn-digits": cnn_digits,
    "lstm-recall": lstm_recall,
    "module": from_file,
}


def make(
    description: dict[str, Any],
    max_params: int | None = MAX_PARAMS,
    device: torch.device | str | None = None,
    allow_code: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Problem:
    """Rebuild a registered problem from its JSON description (as saved in trajectories).

    The description is checked against its schema (``neuralflow._validate.PROBLEM_DESCRIPTIONS``) first,
    and a problem of more than ``max_params`` parameters is refused before it is built (None: no
    limit); a description comes from a file, and a file must not decide how much memory is allocated.
    Nor which code runs: a problem from the user's own Python file (:func:`from_file`) is rebuilt by
    running that file, so only with ``allow_code=True``. ``device`` and ``dtype``: where and in which
    precision to build it (``dtype`` overrides the description's).
    """
    check_problem_description(description, check_max_params(max_params))
    kwargs = dict(description)
    name = kwargs.pop("name", None)
    if name == "module" and not allow_code:
        raise InputError(
            f"this problem is your own Python file ({kwargs.get('path')}:{kwargs.get('function')}); rebuilding it "
            "runs that file. Pass allow_code=True (command line: --allow-code) if you trust it."
        )
    if name not in PROBLEMS:
        raise InputError(
            f"cannot rebuild problem {name!r} from its description; registered problems are "
            f"{sorted(PROBLEMS)}. Build it yourself and pass it explicitly."
        )
    if dtype is not None:
        kwargs["dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in kwargs:
        if kwargs["dtype"] not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {kwargs['dtype']!r}.")
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    for key in ("widths", "channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if "theta0" in kwargs:
        kwargs["theta0"] = tuple(kwargs["theta0"])
    if device is not None:
        kwargs["device"] = device
    return PROBLEMS[name](**kwargs)
