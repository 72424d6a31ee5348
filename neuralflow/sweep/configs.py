"""A sweep's configurations: :func:`grid` (a product of axes), :func:`normalise` (defaults filled in,
every value checked) and :func:`config_key` (the hash that names a run's folder).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..corrections import TERMS
from ..errors import InputError
from ..fit import fit
from ..flows import FLOWS
from ..gd import check_noise
from ..problems import PROBLEMS, check_lr, check_nonnegative_int, check_positive_int

_RUN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "eig_every": 1,
    "n_eigs": 1,
    "store_every": 1,
    "device": "cpu",
    "compare": [],
    "fit": None,
    "quiet_ratio": 0.1,
    "noise": 0.0,
    "noise_seed": 0,
}


_FIT_DEFAULTS: dict[str, Any] = {
    "physics": "gradient",
    "terms": ["Hg"],
    "window": 20,
    "method": "regression",
    "exclude_transients": False,
}


def grid(base: dict[str, Any], axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The configurations of ``base`` with every combination of the ``axes`` values (last axis fastest).

    Axis names are configuration keys; a dotted name sets a nested one (``"problem.seed"``,
    ``"fit.window"``). Example: ``grid({"problem": {...}, "steps": 700}, {"lr": [0.05, 0.1], "problem.seed":
    [0, 1, 2]})`` gives 6 configurations.
    """
    if not isinstance(base, dict):
        raise InputError(f"grid: base must be a configuration dict, got {type(base).__name__}.")
    names = list(axes)
    for name in names:
        values = axes[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or not list(values):
            raise InputError(f"grid: axis {name!r} must be a non-empty list of values, got {values!r}.")
    configs = []
    for combo in itertools.product(*(list(axes[n]) for n in names)):
        config = copy.deepcopy(base)
        for name, value in zip(names, combo, strict=True):
            *path, leaf = name.split(".")
            node = config
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise InputError(f"grid: axis {name!r} goes through {part!r}, which is not a dict in the base.")
            node[leaf] = copy.deepcopy(value)
        configs.append(config)
    return configs


def normalise(config: dict[str, Any], where: str = "run") -> dict[str, Any]:
    """``config`` with defaults filled in and every value checked; raise :class:`InputError` naming ``where``."""

    def bad(why: str) -> InputError:
        return InputError(f"sweep: {where} ({json.dumps(config, default=str)[:200]}): {why}")

    if not isinstance(config, dict):
        raise InputError(f"sweep: {where} must be a configuration dict, got {type(config).__name__}.")
    unknown = sorted(set(config) - set(_RUN_DEFAULTS) - {"problem", "lr"})
    if unknown:
        raise bad(f"unknown keys {unknown}; a configuration has problem, lr and {sorted(_RUN_DEFAULTS)}.")
    out = {**copy.deepcopy(_RUN_DEFAULTS), **copy.deepcopy(config)}
    problem = out.get("problem")
    buildable = sorted(set(PROBLEMS) - {"module"})  # a sweep's worker does not run a user's file named in a config
    if not isinstance(problem, dict) or problem.get("name") not in buildable:
        raise bad(f"'problem' must be a dict whose 'name' is one of {buildable}, got {problem!r}.")
    if "lr" not in config:
        raise bad("no 'lr' given.")
    try:
        out["lr"] = check_lr(out["lr"])
        for name in ("steps", "n_eigs", "store_every"):
            check_positive_int(out[name], name)
        check_nonnegative_int(out["eig_every"], "eig_every", "never")
        out["noise"] = check_noise(out["noise"])
        check_nonnegative_int(out["noise_seed"], "noise_seed")
        if not out["noise"]:  # GD without noise draws nothing: every seed is the same run
            out["noise_seed"] = 0
    except InputError as err:
        raise bad(str(err)) from None
    if not isinstance(out["device"], str):
        raise bad(f"device must be a string such as 'cpu' or 'cuda', got {out['device']!r}.")
    if isinstance(out["compare"], str) or not all(f in FLOWS for f in out["compare"]):
        raise bad(f"'compare' must be a list of flow names from {sorted(FLOWS)}, got {out['compare']!r}.")
    out["compare"] = list(out["compare"])
    if out["fit"] is not None:
        if not isinstance(out["fit"], dict):
            raise bad(f"'fit' must be a dict of fit options (or None), got {out['fit']!r}.")
        options = out["fit"] = {**_FIT_DEFAULTS, **out["fit"]}
        allowed = set(inspect.signature(fit).parameters) - {"model", "trajectory", "progress"}
        unknown = sorted(set(options) - allowed - set(_FIT_DEFAULTS))
        if unknown:
            raise bad(f"unknown fit options {unknown}; fit takes {sorted(allowed | set(_FIT_DEFAULTS))}.")
        if options["physics"] not in FLOWS:
            raise bad(f"fit physics {options['physics']!r} is not a flow; choose from {sorted(FLOWS)}.")
        if isinstance(options["terms"], str) or not options["terms"] or not all(t in TERMS for t in options["terms"]):
            raise bad(f"fit terms must be a non-empty list from {sorted(TERMS)}, got {options['terms']!r}.")
        options["terms"] = list(options["terms"])
    return out


def config_key(config: dict[str, Any]) -> str:
    """A short hash of a normalised configuration: the name of the run's folder (see neuralflow.sweep's docstring)."""
    if not config.get("noise"):
        config = {k: v for k, v in config.items() if k not in ("noise", "noise_seed")}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
