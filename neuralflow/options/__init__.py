"""Command-line options generated from the public functions' signatures (one source of truth).

Every keyword of ``run_gd``, the problem builders, ``compare``, ``fit``, ``TermLibrary``,
``build_report`` and each flow's constructor becomes an option of the command line: its name
(``step_size`` -> ``--step-size``), default and type come from :func:`inspect.signature`, its help
sentence from :data:`HELP`. A keyword the command line carries another way (``progress`` by
``--quiet``) is listed in :data:`ROUTED`, one it deliberately leaves to Python in :data:`API_ONLY`,
each with its reason. A new keyword of any of these functions becomes an option without a change
here; ``tests/test_options.py`` asks for its help sentence.

Flows take their constructor options in the spec that names them: ``central:above_edge=hold``,
several options separated by ``:`` or ``,`` (``gradient,central:above_edge=hold,relaxation=2`` is
two flows). A TOML config file holds the options of one or more subcommands, one table each
(``[run-gd]``, ``[fit]``, ...); every command writes the options it ran with back beside its results.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .tables import API_ONLY, CHOICES, HELP, ROUTED

_EXPECTED: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bool": bool,
    "tristate": bool,
}  # the Python types a TOML config value of each option kind may have

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

_DTYPES = ("float64", "float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------ options
def _kind(annotation: Any, default: Any) -> str:
    """The option kind of a keyword, from its annotation (a string under ``from __future__ import annotations``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    text = text.replace(" ", "").replace("typing.", "")
    parts = set(text.split("|")) - {"None"}
    if text.startswith("Sequence[tuple[int,int]]") or text.startswith("Sequence[tuple[int|None,int|None]]"):
        return "ranges"
    if parts & {"Sequence[str]", "list[str]", "tuple[str,...]"}:
        return "names"
    if parts & {"Sequence[int]", "list[int]", "tuple[int,...]"}:
        return "ints"
    if parts & {"Sequence[float]", "list[float]", "tuple[float,...]"}:
        return "floats"
    if "torch.dtype" in parts:
        return "dtype"
    if parts == {"bool"}:
        return "tristate" if "None" in text else "bool"
    for simple in ("int", "float", "str"):
        if parts - {"os.PathLike", "Path"} == {simple}:
            return simple
    if "torch.device" in parts:
        return "str"
    if annotation is inspect.Parameter.empty and default is not None and type(default) in (int, float, str, bool):
        return type(default).__name__
    raise InputError(
        f"no command-line form for a keyword annotated {text!r} (default {default!r}); add one to "
        "neuralflow.options or list the keyword in options.API_ONLY with the reason."
    )


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ranges(text: str) -> list[tuple[int | None, int | None]]:
    out = []
    for part in _split(text):
        m = re.fullmatch(r"(-?\d*):(-?\d*)", part)
        if not m:
            raise ValueError(f"{part!r} is not a step range START:STOP")
        start, stop = (int(x) if x else None for x in m.groups())
        out.append((start, stop))
    return out


def _tristate(text: str) -> bool | None:
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not auto, true or false")


def _bool(text: str) -> bool:
    value = _tristate(text)
    if value is None:
        raise ValueError(f"{text!r} is not true or false")
    return value


def _dtype(text: str) -> torch.dtype:
    name = text.strip().removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"{text!r} is not a floating dtype ({', '.join(_DTYPES)})")
    return getattr(torch, name)


_PARSE: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _bool,
    "tristate": _tristate,
    "names": _split,
    "ranges": _ranges,
    "dtype": _dtype,
    "ints": int,
    "floats": float,
}


@dataclass(frozen=True)
class Option:
    """One keyword of a public function as a command-line option."""

    owner: str
    name: str
    default: Any
    kind: str
    optional: bool  # None is a value (the annotation allows it)
    required: bool  # the function has no default
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[str, ...] | None:
        return CHOICES.get(f"{self.owner}.{self.name}", CHOICES.get(self.name))

    def parse(self, text: str) -> Any:
        """The keyword's value from its text (a flow spec's ``key=value``, a config string)."""
        if self.optional and text.strip().lower() == "none":
            return None
        value = _PARSE[self.kind](text)
        if self.kind in ("ints", "floats"):
            value = [value]
        if self.choices and value not in self.choices:
            raise InputError(f"{self.name}={text!r}: choose from {', '.join(self.choices)}.")
        return value

    def coerce(self, value: Any) -> Any:
        """A config file's value (TOML types) as the keyword's value."""
        if isinstance(value, str) and self.kind not in ("str",):
            if self.kind in ("ints", "floats"):
                return [_PARSE[self.kind](v) for v in value.replace(",", " ").split()]
            return self.parse(value)
        if self.kind in ("ints", "floats", "names") and isinstance(value, list):
            return [_PARSE[self.kind](str(v)) if self.kind != "names" else str(v) for v in value]
        expected = _EXPECTED.get(self.kind)
        if expected is None or not isinstance(value, expected) or (self.kind == "int" and isinstance(value, bool)):
            raise InputError(f"{self.name} = {value!r}: expected {self.kind}.")
        return float(value) if self.kind == "float" and isinstance(value, (int, float)) else value

    def text(self, value: Any) -> Any:
        """The value in the form a config file (TOML) holds, None for 'leave out'."""
        if value is None:
            return None
        if self.kind == "ranges":
            return ",".join(f"{'' if a is None else a}:{'' if b is None else b}" for a, b in value)
        if self.kind == "dtype":
            return str(value).removeprefix("torch.")
        if self.kind in ("names", "ints", "floats"):
            return list(value)
        return value

    def shown(self, value: Any) -> str:
        """The value as the help shows it."""
        shown = self.text(value)
        if isinstance(shown, list):
            shown = ",".join(map(str, shown)) if self.kind == "names" else " ".join(map(str, shown))
        return "automatic" if shown is None else (shown if shown not in ("", []) else "none")

    def add_to(
        self,
        parser: argparse.ArgumentParser | Any,
        default: Any = inspect.Parameter.empty,
        shown_default: str | None = None,
    ) -> None:
        """Add this option to ``parser``; the help ends with the default (``shown_default`` replaces it)."""
        default = self.default if default is inspect.Parameter.empty else default
        shown = shown_default or self.shown(default)
        help_ = self.help if "default:" in self.help else f"{self.help} (default: {shown})"
        kw: dict[str, Any] = {"dest": self.name, "default": default, "help": help_.replace("%", "%%")}
        if self.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _PARSE[self.kind]
            if self.kind in ("ints", "floats"):
                kw["nargs"] = "+"
            if self.choices:
                kw["choices"] = self.choices
            kw["metavar"] = self.name.upper() if not self.choices else None
        parser.add_argument(self.flag, **kw)


def _callable_name(fn: Any) -> str:
    return getattr(getattr(fn, "func", fn), "__name__", repr(fn))


def options_of(fn: Any, owner: str | None = None, skip: Iterable[str] = ()) -> list[Option]:
    """The options of ``fn``'s keywords, except those routed, API-only or in ``skip``.

    ``fn`` may be a ``functools.partial`` (its bound keywords are not options) or a class (its
    constructor). A keyword without a sentence in :data:`HELP` gets a pointer at the docstring
    (:func:`missing_help` lists them; the options test asks for a sentence).
    """
    owner = owner or _callable_name(fn)
    bound = set(fn.keywords) if isinstance(fn, partial) else set()
    out = []
    for p in inspect.signature(fn).parameters.values():
        key = f"{owner}.{p.name}"
        if (
            p.name in bound
            or p.name == "self"
            or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            or p.name in skip
            or key in ROUTED
            or key in API_ONLY
        ):
            continue
        required = p.default is inspect.Parameter.empty
        default = None if required else p.default
        kind = _kind(p.annotation, default)
        help_ = HELP.get(key) or HELP.get(p.name) or f"{p.name} of {owner} (see its docstring)."
        out.append(
            Option(
                owner,
                p.name,
                tuple(default) if isinstance(default, list) else default,
                kind,
                "None" in str(p.annotation),
                required,
                help_,
            )
        )
    return out


def missing_help(fn: Any, owner: str | None = None) -> list[str]:
    """Keywords of ``fn`` that are options but have no sentence in :data:`HELP` (the options test asks for one)."""
    return [o.name for o in options_of(fn, owner) if f"{o.owner}.{o.name}" not in HELP and o.name not in HELP]


# ----------------------------------------------------------------------------------------------- flow specs
def flow_options(builder: Any) -> dict[str, Option]:
    """A registered flow's constructor options (beyond ``problem`` and ``lr``), by keyword."""
    return {o.name: o for o in options_of(builder, "flow")}


def parse_flows(text: str, registry: dict[str, Any], what: str = "flows") -> list[tuple[str, dict[str, Any]]]:
    """``"gradient,central:above_edge=hold:relaxation=2"`` -> ``[("gradient", {}), ("central", {...})]``.

    A flow's options follow its name after ``:``, separated by ``:`` or ``,``; a piece with ``=`` and no
    flow name belongs to the flow before it. Values are parsed by the constructor's signature.
    """
    specs: list[tuple[str, dict[str, Any]]] = []
    for piece in _split(text):
        head, *rest = piece.split(":")
        if "=" in head:
            if not specs:
                raise InputError(f"{what}: {piece!r} is an option before any flow; write NAME:{piece}.")
            rest = [head, *rest]
        else:
            if head not in registry:
                raise InputError(f"{what}: unknown flow {head!r}; choose from {', '.join(registry)}.")
            specs.append((head, {}))
        name, kwargs = specs[-1]
        known = flow_options(registry[name])
        for item in rest:
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in known:
                raise InputError(
                    f"{what}: {name} has no option {item!r}; its options are "
                    f"{', '.join(f'{k}={o.text(o.default)}' for k, o in known.items()) or 'none'}."
                )
            try:
                kwargs[key] = known[key].parse(value)
            except ValueError as err:
                raise InputError(f"{what}: {name}:{item}: {err}.") from None
    if not specs:
        raise InputError(f"{what}: name at least one flow; choose from {', '.join(registry)}.")
    return specs


def flows_help(registry: dict[str, Any]) -> str:
    """One line per registered flow with its options and their defaults, for ``--help``."""
    lines = []
    for name, builder in registry.items():
        opts = flow_options(builder)
        lines.append(format_flows([(name, {k: o.default for k, o in opts.items()})], registry))
    return "; ".join(lines)


def format_flows(specs: list[tuple[str, dict[str, Any]]], registry: dict[str, Any]) -> str:
    """The inverse of :func:`parse_flows` (for the config written back)."""
    out = []
    for name, kwargs in specs:
        known = flow_options(registry[name])
        out.append(":".join([name, *(f"{k}={'none' if v is None else known[k].text(v)}" for k, v in kwargs.items())]))
    return ",".join(out)


# ------------------------------------------------------------------------------------------------ config files
def read_config(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict (``tomllib`` on Python 3.11+, ``tomli`` before)."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"--config {path}: no such file.") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"--config {path}: not valid TOML ({err}).") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def write_config(path: str | Path, command: str, values: dict[str, Any], comments: dict[str, Any]) -> Path:
    """Write ``values`` as the ``[command]`` table of a TOML file, ``comments`` as ``# key: value`` lines first."""
    lines = [f"# {k}: {v}" for k, v in comments.items()]
    lines.append(f"[{command}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
