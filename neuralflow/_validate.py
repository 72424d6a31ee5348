"""Checks shared by every stage: argument values, and the metadata of saved files against declared schemas.

A file's metadata is data from outside: before anything is built from it, it is checked against the
schema of its kind in :data:`SCHEMAS` (types, ranges, known names, sizes; unknown keys are refused).
To add a metadata key, add it to the table here (``TRAJECTORY_META`` for ``Trajectory.meta``,
``PROBLEM_DESCRIPTIONS`` for a problem's description, ...). Checks raise :class:`InputError` with the
key's path in the metadata; the file readers add the file name and raise :class:`FileFormatError`.

A problem rebuilt from a description larger than :data:`MAX_PARAMS` parameters is refused unless the
caller raises the limit (``max_params=None`` for none): a few bytes of JSON must not make the loader
allocate gigabytes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

MAX_PARAMS = 10_000_000
MAX_DEPTH = 32
DTYPES = ("float64", "float32")  # float16 and bfloat16 are refused: the eigen-solves break down in them


def check_positive_finite(value: Any, name: str) -> float:
    """A positive finite number (not a bool), e.g. a step size or a tolerance."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def renamed(new: Any, old: Any, names: str, where: str, default: Any = None) -> Any:
    """The value of a keyword renamed ``"old -> new"`` (``names``): the old name still works, with a
    :class:`DeprecationWarning`; both at once (the new one away from its ``default``) is an :class:`InputError`."""
    if old is None:
        return new
    before, after = names.split(" -> ")
    if new is not None and new != default:
        raise InputError(f"{where}: pass {after}= only ({before}= is its old name).")
    warnings.warn(
        f"{where}: {before}= is now {after}= (the old name will go in a later release).",
        DeprecationWarning,
        stacklevel=3,
    )
    return old


def check_max_params(max_params: int | None) -> int | None:
    if max_params is not None and (isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1):
        raise InputError(f"max_params must be a positive int or None (no limit), got {max_params!r}.")
    return max_params


# ------------------------------------------------------------------------------------------ the schema language


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Spec:
    """One node of a schema: ``check(value, at)`` raises :class:`InputError` naming the path ``at``."""

    def check(self, value: Any, at: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Num(Spec):
    """A JSON number (not a bool) in ``[low, high]`` (``low`` excluded if ``open_low``), finite unless ``nan_ok``."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    nan_ok: bool = False

    def check(self, value: Any, at: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{at} must be a number, got {_show(value)}.")
        if math.isnan(value) and self.nan_ok:
            return
        if not math.isfinite(value) and not (self.nan_ok and math.isinf(value)):
            raise InputError(f"{at} must be a finite number, got {value!r}.")
        if value < self.low or value > self.high or (self.open_low and value == self.low):
            bracket = "(" if self.open_low else "["
            raise InputError(f"{at} must lie in {bracket}{self.low:g}, {self.high:g}], got {value!r}.")


@dataclass(frozen=True)
class Int(Spec):
    """A JSON integer (not a bool, not a float) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None

    def check(self, value: Any, at: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{at} must be an integer, got {_show(value)}.")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise InputError(f"{at} must be an integer in [{self.low}, {self.high}], got {value!r}.")


@dataclass(frozen=True)
class Str(Spec):
    """A string, one of ``choices`` if given, at most ``max_len`` characters."""

    choices: tuple[str, ...] | None = None
    max_len: int = 100_000

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, str):
            raise InputError(f"{at} must be a string, got {_show(value)}.")
        if self.choices is not None and value not in self.choices:
            raise InputError(f"{at} is {_show(value)}; known values are {list(self.choices)}.")
        if len(value) > self.max_len:
            raise InputError(f"{at} is a string of {len(value)} characters, more than {self.max_len}.")


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, bool):
            raise InputError(f"{at} must be true or false, got {_show(value)}.")


@dataclass(frozen=True)
class Optional(Spec):
    """None (JSON null) or ``spec``."""

    spec: Spec

    def check(self, value: Any, at: str) -> None:
        if value is not None:
            self.spec.check(value, at)


@dataclass(frozen=True)
class List(Spec):
    """A list of ``item`` with ``min_len <= len <= max_len``."""

    item: Spec
    min_len: int = 0
    max_len: int = 10_000_000

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, list):
            raise InputError(f"{at} must be a list, got {_show(value)}.")
        if not self.min_len <= len(value) <= self.max_len:
            raise InputError(f"{at} must have {self.min_len} to {self.max_len} entries, got {len(value)}.")
        for i, v in enumerate(value):
            self.item.check(v, f"{at}[{i}]")


@dataclass(frozen=True)
class Map(Spec):
    """A dict from any string key to ``value``."""

    value: Spec

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise InputError(f"{at} must be a mapping, got {_show(value)}.")
        for k, v in value.items():
            self.value.check(v, f"{at}.{k}")


@dataclass(frozen=True)
class Json(Spec):
    """Any JSON value nested at most ``MAX_DEPTH`` deep (checked without recursion)."""

    def check(self, value: Any, at: str) -> None:
        stack = [(value, 0)]
        while stack:
            v, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise InputError(f"{at} is nested more than {MAX_DEPTH} levels deep.")
            if isinstance(v, dict):
                stack.extend((x, depth + 1) for x in v.values())
            elif isinstance(v, list):
                stack.extend((x, depth + 1) for x in v)
            elif not (v is None or isinstance(v, (bool, int, float, str))):
                raise InputError(f"{at} holds a {type(v).__name__}, which is not JSON.")


@dataclass(frozen=True)
class Record(Spec):
    """A dict with declared keys: ``fields`` (key -> spec), of which ``required`` must be present.

    A key not declared is refused, unless ``extra`` gives the spec its value must meet.
    """

    fields: dict[str, Spec]
    required: tuple[str, ...] = ()
    extra: Spec | None = None

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise InputError(f"{at} must be a mapping, got {_show(value)}.")
        missing = [k for k in self.required if k not in value]
        if missing:
            raise InputError(f"{at} lacks {missing}.")
        for k, v in value.items():
            spec = self.fields.get(k, self.extra)
            if spec is None:
                raise InputError(f"{at} has the unknown key {_show(k)}; known keys are {sorted(self.fields)}.")
            spec.check(v, f"{at}.{k}")

    def extended(self, **more: Spec) -> Record:
        """This record with more declared keys (optional ones)."""
        return Record({**self.fields, **more}, self.required, self.extra)


@dataclass(frozen=True)
class ByName(Spec):
    """A dict whose ``"name"`` selects its record in ``cases``; ``other`` for names not listed (None: refuse).

    A dict holding the key ``marker`` is always ``other`` (a user's own problem may share a registered name);
    with ``empty_ok`` an empty dict passes (nothing named, nothing to build).
    """

    cases: dict[str, Record]
    other: Record | None = None
    marker: str | None = None
    empty_ok: bool = False

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise InputError(f"{at} must be a mapping, got {_show(value)}.")
        if self.empty_ok and not value:
            return
        name = value.get("name")
        Str(max_len=200).check(name, f"{at}.name")
        record = (
            self.other if self.marker is not None and self.marker in value else self.cases.get(str(name), self.other)
        )
        if record is None:
            raise InputError(f"{at}.name is {_show(name)}; known names are {sorted(self.cases)}.")
        record.check(value, at)


# ------------------------------------------------------------------------------------------------- the schemas

POSITIVE = Num(0.0, open_low=True)
LR = POSITIVE
NUMBERS = List(Num())
SEED = Int(0, 2**63 - 1)


@dataclass(frozen=True)
class _Problem:
    """A registered problem's description and the number of parameters it builds (before building it)."""

    record: Record
    size: Callable[[dict[str, Any]], int] = field(default=lambda d: len(d.get("theta0", ())))


def _mlp_size(d: dict[str, Any]) -> int:
    sizes = (64, *d.get("widths", (64, 64)), 10)
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _cnn_size(c1: int, c2: int) -> int:
    return (9 + 1) * c1 + (9 * c1 + 1) * c2 + (16 * c2 + 1) * 10


def _lstm_size(hidden: int) -> int:
    return 4 * hidden * (1 + hidden) + 8 * hidden + hidden + 1


def _named(fields: dict[str, Spec], required: Sequence[str] = ()) -> Record:
    return Record({"name": Str(max_len=200), **fields}, ("name", *required))


PROBLEM_DESCRIPTIONS: dict[str, _Problem] = {
    "quadratic": _Problem(_named({"A": List(NUMBERS), "theta0": NUMBERS, "dtype": Str(DTYPES)}, ("A",))),
    "zhu-quartic": _Problem(_named({"theta0": List(Num(), 2, 2), "dtype": Str(DTYPES)})),
    "scalar-factorization": _Problem(
        _named({"depth": Int(1), "theta0": NUMBERS, "dtype": Str(DTYPES)}), lambda d: d.get("depth", 3)
    ),
    "mlp-digits": _Problem(
        _named(
            {
                "n": Int(1, 1797),
                "widths": List(Int(1), 0, 64),
                "seed": SEED,
                "dtype": Str(DTYPES),
                "activation": Str(("tanh", "gelu", "softplus", "sigmoid", "relu")),
                "batch_size": Optional(Int(1)),
            }
        ),
        _mlp_size,
    ),
    "cnn-digits": _Problem(
        _named(
            {
                "n": Int(1, 1797),
                "channels": List(Int(1, 4096), 2, 2),
                "seed": SEED,
                "dtype": Str(DTYPES),
                "activation": Str(("tanh", "gelu", "softplus", "sigmoid", "relu")),
                "batch_size": Optional(Int(1)),
            }
        ),
        lambda d: _cnn_size(*d.get("channels", (8, 8))),
    ),
    "lstm-recall": _Problem(
        _named(
            {"n": Int(1, 100_000), "length": Int(1, 1000), "hidden": Int(1, 4096), "seed": SEED, "dtype": Str(DTYPES)}
        ),
        lambda d: _lstm_size(d.get("hidden", 8)),
    ),
    # The user's own Python file (problems.from_file): rebuilt only when the caller allows running it.
    "module": _Problem(
        _named(
            {
                "path": Str(max_len=4096),
                "function": Str(max_len=200),
                "loss": Str(("mse", "ce")),
                "batch_size": Optional(Int(1)),
                "dtype": Str(DTYPES),
            },
            ("path", "function"),
        ),
        lambda d: 0,
    ),
}
# Problems that cannot be rebuilt from their description (from_module, from_function): the user passes them.
OTHER_PROBLEM = _named(
    {
        "module": Str(),
        "examples": Int(1),
        "loss": Str(),
        "batch_size": Optional(Int(1)),
        "function": Str(),
        "theta0": NUMBERS,
    }
)
# from_module descriptions carry "module" (the net's repr) and are named after its class, which may be any name.
PROBLEM = ByName({k: v.record for k, v in PROBLEM_DESCRIPTIONS.items()}, OTHER_PROBLEM, marker="module", empty_ok=True)

# ``Trajectory.meta``: what run_gd and the trajectory's own methods record.
# run_gd's settings are checked; a user may add notes of their own (Trajectory.meta is free-form JSON).
TRAJECTORY_META = Record(
    {
        "eig_every": Int(0),
        "n_eigs": Int(1),
        "store_every": Int(1),
        "eig_tol": POSITIVE,
        "smoothed": Bool(),
        "eig_retries": Int(0),
        "noise": Num(0.0),
        "noise_seed": SEED,
    },
    extra=Json(),
)
# (a fit file holds an empty history in its JSON part; a non-empty one is tensors)
TRAJECTORY = Record({"lr": LR, "problem": PROBLEM, "meta": TRAJECTORY_META, "history": Map(Json())}, ("lr",))

_TENSOR_LAYOUT = Map(Json())  # "tensor" or the list of a dict's keys, checked when the tensors are matched
_COEFFICIENTS = Map(Num(nan_ok=True))
_CONFIG = Record({"name": Str(max_len=200), "lr": LR}, ("name",), extra=Json())
FIT = Record(
    {
        "problem": PROBLEM,
        "check": Record({"first_loss": Num()}, ("first_loss",)),
        "model": Record({"name": Str(max_len=200), "flow": _CONFIG, "correction": Optional(_CONFIG)}, ("flow",)),
        "result": Record(
            {
                "json": Record({"coefficients": _COEFFICIENTS, "uncertainty": _COEFFICIENTS}, extra=Json()),
                "tensors": _TENSOR_LAYOUT,
            },
            ("json", "tensors"),
        ),
        "trajectory": Record({"json": TRAJECTORY, "tensors": _TENSOR_LAYOUT}, ("json", "tensors")),
        "report": Optional(Json()),
        "report_error": Optional(Str()),
    },
    ("problem", "check", "model", "result", "trajectory"),
)

# A simulation in progress (checkpoint.save_simulation): the flow, where it stands in time, its problem.
SIMULATION = Record(
    {"problem": PROBLEM, "flow": _CONFIG, "t": Num(), "check": Record({"first_loss": Num()}, ("first_loss",))},
    ("problem", "flow", "t", "check"),
)

# A run_gd checkpoint (resume): the run's settings and where it stands.
GD_CHECKPOINT = Record(
    {
        "lr": LR,
        "problem": PROBLEM,
        "steps": Int(1),
        "next_step": Int(0),
        "eig_every": Int(0),
        "n_eigs": Int(1),
        "store_every": Int(1),
        "eig_tol": POSITIVE,
        "eig_retries": Int(0),
        "last_sharpness": Num(nan_ok=True),
        "noise": Num(0.0),
        "noise_seed": SEED,
    },
    ("lr", "problem", "steps", "next_step", "eig_every", "n_eigs", "store_every", "eig_tol"),
)

# A fit's Gauss-Newton state (fit(..., resume=)).
FIT_CHECKPOINT = Record(
    {
        "settings": Json(),
        "targets_sha256": Str(max_len=64),
        "iteration": Int(0),
        "mu": Num(nan_ok=True),
        "finished": Bool(),
        "history": List(Json()),
        "best_score": Num(nan_ok=True),
        "best_iteration": Int(0),
        "stale": Int(0),
    },
    ("settings", "targets_sha256", "iteration", "mu", "finished", "history", "best_score", "best_iteration", "stale"),
)

# The metadata schema of each file kind; one entry per kind a file may hold.
# One finished run of a sweep: its table row (flat JSON: configuration, measurements, coefficients).
SWEEP_ROW = Record({"row": Map(Json())}, ("row",))

SCHEMAS: dict[str, Spec] = {
    "trajectory": TRAJECTORY,
    "fit": FIT,
    "gd-checkpoint": GD_CHECKPOINT,
    "fit-checkpoint": FIT_CHECKPOINT,
    "sweep-row": SWEEP_ROW,
    "simulation": SIMULATION,
}

HEADER = Record(
    {
        "kind": Str(max_len=100),
        "format_version": Int(1),
        "neuralflow_version": Str(max_len=100),
        "torch_version": Str(max_len=100),
        "sha256": Str(max_len=64),
        "meta": Json(),
        "provenance": Map(Json()),
    },
    ("kind", "format_version", "sha256", "meta"),
)


def check_problem_description(description: Any, max_params: int | None = MAX_PARAMS, at: str = "problem") -> None:
    """Validate a registered problem's description and the size of what it would build.

    Raises :class:`InputError` naming the key; a problem of more than ``max_params`` parameters
    (None: no limit) is refused before it is built.
    """
    PROBLEM.check(description, at)
    entry = PROBLEM_DESCRIPTIONS.get(description["name"])
    if entry is None or max_params is None:
        return
    size = entry.size(description)
    if size > max_params:
        raise InputError(
            f"{at} describes a problem of {size:,} parameters, more than the limit of {max_params:,}; if you trust "
            "the file, raise the limit (max_params=..., or None for none)."
        )
