"""Checkpoints of fitted models: save a :class:`~neuralflow.fit.FitResult`, load it back working.

The persist stage of the pipeline (see the README). A checkpoint is one file (suffix ``.nff``, kind ``"fit"``) in
the safe container of :mod:`neuralflow._io`: a safetensors file whose JSON header carries the
format version, the neuralflow and torch versions and a SHA-256 of the metadata and the tensors. Writes
are atomic (temporary file in the same folder, then rename), so a crash mid-save leaves any previous
checkpoint intact; loading parses JSON and raw numbers only, never executes code from the file, and
checks the metadata against its schema (:data:`neuralflow._validate.FIT`) before building anything.

Format version 2 (``_io.FORMAT_VERSION``; version 1, whose checksum covers the tensors only, still
loads). Tensors, by name:

* ``model.<key>``: the fitted model's ``state_dict()`` (a :class:`~neuralflow.corrections.Hybrid`);
* ``trajectory.<field>`` and ``trajectory.<field>.<key>``: the fit's targets, a
  :class:`~neuralflow.trajectory.Trajectory` (its tensor fields, and its ``history`` series);
* ``result.<field>`` and ``result.<field>.<key>``: the result's tensors (per-window errors, the
  windows' start steps and validation mask).

JSON metadata (``header["meta"]``):

* ``problem``: the problem's description; registered problems are rebuilt from it with
  :func:`neuralflow.problems.make`, others (``from_module``, ``from_function``) must be passed
  to :func:`load` as ``problem=``;
* ``check``: the loss at the first target state, recomputed on load to confirm that the problem
  is the one the fit was made on;
* ``model``: ``Hybrid.config()``: the physics flow's ``config()`` (rebuilt through
  :data:`neuralflow.flows.FLOWS`) and the correction's ``config()`` (through
  :data:`neuralflow.corrections.CORRECTIONS`);
* ``result`` and ``trajectory``: ``{"json": ..., "tensors": ...}``, every other field of the
  dataclass as JSON (coefficients, uncertainty, fit settings, history, timing, errors) and the
  layout of its tensors (``"tensor"`` or the list of a dict's keys);
* ``report``: the numbers of :func:`neuralflow.report.build_report` at save time
  (``Report.to_dict()``), or None with the reason in ``report_error``.

:func:`load` returns a working ``FitResult``: the model integrates, its coefficients are those
saved, and a simulation with the loaded model is bit-for-bit the one with the saved model on the
same machine. :func:`stored_report` reads the saved report's numbers without rebuilding anything;
:func:`info` the metadata.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _io
from ._validate import MAX_PARAMS
from .corrections import CORRECTIONS, Correction, Hybrid, TermLibrary
from .errors import FileFormatError, InputError, NeuralflowError
from .fit import FitResult
from .flows import FLOWS
from .flows.base import Flow
from .problems import PROBLEMS, Problem, make
from .report import Report, build_report
from .trajectory import Trajectory

__all__ = ["SUFFIX", "save", "load", "stored_report", "info", "save_simulation", "load_simulation"]

SUFFIX = ".nff"
_KIND = "fit"
_CHECK_RTOL = 1e-9


# ------------------------------------------------------------------------------------ dataclass codec


def _encode(obj: Any, prefix: str, tensors: dict[str, Tensor], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Put the tensor fields of dataclass ``obj`` into ``tensors`` under ``prefix``; return the rest as JSON.

    A field is stored as a tensor if it is one, as several tensors if it is a non-empty dict of
    tensors, and as JSON otherwise (an error names a field that is none of these).
    """
    plain: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            tensors[prefix + f.name] = value
            layout[f.name] = "tensor"
        elif isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            for key, v in value.items():
                tensors[f"{prefix}{f.name}.{key}"] = v
            layout[f.name] = list(value)
        else:
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise InputError(
                    f"save: {type(obj).__name__}.{f.name} holds {type(value).__name__}, which is neither tensors nor "
                    "JSON; store plain numbers, strings, lists and dicts there."
                ) from None
            plain[f.name] = value
    return {"json": plain, "tensors": layout}


def _decode(
    cls: type,
    part: dict[str, Any],
    prefix: str,
    tensors: dict[str, Tensor],
    device: torch.device,
    where: str,
    **extra: Any,
) -> Any:
    """Inverse of :func:`_encode`: rebuild ``cls`` from its JSON part and its tensors (moved to ``device``)."""
    kwargs = dict(part["json"])
    try:
        for name, layout in part["tensors"].items():
            if layout == "tensor":
                kwargs[name] = tensors.pop(prefix + name).to(device)
            else:
                kwargs[name] = {key: tensors.pop(f"{prefix}{name}.{key}").to(device) for key in layout}
    except KeyError as exc:
        raise FileFormatError(f"{where}: tensor {exc} named in the metadata is missing from the file.") from None
    try:
        return cls(**kwargs, **extra)
    except (TypeError, InputError) as exc:
        raise FileFormatError(f"{where}: the stored {cls.__name__} does not fit together ({exc}).") from None


# ----------------------------------------------------------------------------------------- the model


def _registered(registry: dict[str, Any], part: Flow, what: str) -> None:
    entry = registry.get(part.name)
    cls = getattr(entry, "func", entry)  # FLOWS holds functools.partial for the modified flows
    if cls is None or type(part) is not cls:
        raise InputError(
            f"save: the {what} {type(part).__name__} (name {part.name!r}) is not in the {what} registry "
            f"({sorted(registry)}), so a checkpoint could not rebuild it; register it there first."
        )


def _build(registry: dict[str, Any], config: dict[str, Any], problem: Problem, what: str, where: str) -> Any:
    cfg = dict(config)
    name, lr = cfg.pop("name", None), cfg.pop("lr", None)
    if name not in registry:
        raise FileFormatError(
            f"{where}: unknown {what} {name!r}; this neuralflow knows {sorted(registry)} (upgrade neuralflow, or "
            "register the missing one before loading)."
        )
    try:
        return registry[name](problem, lr, **cfg)
    except (TypeError, NeuralflowError) as exc:
        raise FileFormatError(
            f"{where}: cannot rebuild the {what} {name!r} from its settings {config} ({exc})."
        ) from None


def _model(config: dict[str, Any], problem: Problem, state: dict[str, Tensor], where: str) -> Hybrid:
    flow = _build(FLOWS, config["flow"], problem, "flow", where)
    correction = config.get("correction")
    model = Hybrid(flow, None if correction is None else _build(CORRECTIONS, correction, problem, "correction", where))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(f"{where}: the model's tensors do not match its settings ({exc}).") from None
    return model


# -------------------------------------------------------------------------------------- the problem


def _first_loss(problem: Problem, trajectory: Trajectory) -> float:
    with torch.no_grad():
        return float(problem.loss(trajectory.iterates[0].to(device=problem.device, dtype=problem.dtype)))


def _problem(
    meta: dict[str, Any],
    problem: Problem | None,
    device: Any,
    where: str,
    max_params: int | None,
    allow_code: bool = False,
) -> Problem:
    description = meta["problem"]
    if problem is None:
        if description.get("name") not in PROBLEMS:
            raise InputError(
                f"{where}: the fit was made on problem {description.get('name')!r}, which cannot be rebuilt from its "
                f"description ({description}); build that problem again (e.g. with problems.from_module) and pass "
                "it: checkpoint.load(path, problem=...)."
            )
        try:
            problem = make(description, max_params, device=device, allow_code=allow_code)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
    elif not isinstance(problem, Problem):
        raise InputError(f"load: problem must be a neuralflow Problem, got {type(problem).__name__}.")
    if problem.name != description.get("name"):
        raise InputError(
            f"{where}: the fit was made on problem {description.get('name')!r} but the problem passed is "
            f"{problem.name!r}."
        )
    return problem


# ------------------------------------------------------------------------------------------ public


def save(result: FitResult, path: str | os.PathLike, report: Report | bool = True) -> Path:
    """Write a fit's result to a file atomically: tensors and JSON, no pickle.

    The format is described in the module docstring; :func:`load` reads it back.

    Parameters
    ----------
    result : FitResult
        The fit (from :func:`neuralflow.fit.fit`); its flow and correction must be registered ones.
    path : str or PathLike
        The file (suffix ``.nff`` by convention); replaced atomically if it exists.
    report : Report or bool, default True
        True: store the numbers of ``build_report(result)``, computed here (a failure is recorded in the file
        and reported as a warning, never fails the save); a :class:`Report` already built: store it as it is;
        False: store none.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    InputError
        When ``result`` is not a ``FitResult`` or its model is not made of registered flows and corrections.
    """
    if not isinstance(result, FitResult):
        raise InputError(f"save: expected a FitResult (from nf.fit), got {type(result).__name__}.")
    model = result.model
    _registered(FLOWS, model.flow, "flow")
    if model.correction is not None:
        _registered(CORRECTIONS, model.correction, "correction")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    report_dict, report_error = None, None
    if isinstance(report, Report):
        report_dict = report.to_dict()
    elif report:
        try:
            report_dict = build_report(result).to_dict()
        except (NeuralflowError, RuntimeError, ValueError) as exc:
            report_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"save: the report could not be built, the checkpoint holds none ({report_error}).", stacklevel=2
            )
    meta = {
        "problem": model.problem.description,
        "check": {"first_loss": _first_loss(model.problem, result.trajectory)},
        "model": model.config(),
        "result": _encode(result, "result.", tensors, skip=("model", "trajectory")),
        "trajectory": _encode(result.trajectory, "trajectory.", tensors),
        "report": report_dict,
        "report_error": report_error,
    }
    return _io.write(path, _KIND, tensors, meta)


def load(
    path: str | os.PathLike,
    problem: Problem | None = None,
    device: torch.device | str | None = None,
    max_params: int | None = MAX_PARAMS,
    allow_code: bool = False,
) -> FitResult:
    """Read a checkpoint written by :func:`save` and rebuild a working :class:`FitResult`.

    Either way the problem is obtained, its loss at the first target state must match the one recorded.

    Parameters
    ----------
    path : str or PathLike
        The ``.nff`` file.
    problem : Problem, optional
        The problem the fit was made on, for problems that cannot be rebuilt from their description
        (``from_module``, ``from_function``); None: rebuilt from the stored description.
    device : torch.device or str, optional
        Where a problem rebuilt from its description lives (the model and the tensors follow the problem);
        None: the CPU. Unused when ``problem`` is given.
    max_params : int or None, default MAX_PARAMS
        A problem of more parameters is not rebuilt from a file unless the limit is raised; None: no limit.
    allow_code : bool, default False
        Rebuild a problem from the user's own Python file (:func:`~neuralflow.problems.from_file`), which runs
        that file.

    Returns
    -------
    FitResult
        The fit, with its model, trajectory, coefficients and settings.

    Raises
    ------
    FileFormatError
        When the file is not a fit checkpoint, is damaged, or its parts do not fit together; the error names the
        file.
    InputError
        When the problem cannot be rebuilt (too large, code not allowed, unregistered) or gives another loss at
        the first state than the one recorded; the error says what to pass.
    """
    tensors, header = _io.read(path, _KIND)
    meta = header["meta"]
    where = str(path)
    try:
        problem = _problem(meta, problem, device, where, max_params, allow_code)
        trajectory = _decode(Trajectory, meta["trajectory"], "trajectory.", tensors, problem.device, where)
        state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        model = _model(meta["model"], problem, state, where)
        for k in list(state):
            tensors.pop("model." + k)
        result = _decode(
            FitResult, meta["result"], "result.", tensors, problem.device, where, model=model, trajectory=trajectory
        )
    except KeyError as exc:
        raise FileFormatError(f"{where}: the metadata lacks {exc}; the file is damaged.") from None
    if tensors:
        raise FileFormatError(f"{where}: tensors {sorted(tensors)} are not described by the metadata.")
    if trajectory.dim != problem.dim:
        raise FileFormatError(
            f"{where}: the stored trajectory has {trajectory.dim} parameters but problem {problem.name!r} has "
            f"{problem.dim}."
        )
    recorded, now = float(meta["check"]["first_loss"]), _first_loss(problem, trajectory)
    if not math.isclose(recorded, now, rel_tol=_CHECK_RTOL, abs_tol=1e-300):
        raise InputError(
            f"{where}: the problem gives loss {now:.12g} at the fit's first state but the checkpoint recorded "
            f"{recorded:.12g}; pass the problem (data, architecture) the fit was made on."
        )
    _check_coefficients(model.correction, result.coefficients, where)
    return result


def _check_coefficients(correction: Correction | None, coefficients: dict[str, float], where: str) -> None:
    """A constant coefficient in the metadata must equal its parameter in the tensors."""
    if not isinstance(correction, TermLibrary):
        return
    for name, parameter in correction.constants.items():
        value = float(parameter.detach())
        if name in coefficients and not math.isclose(value, coefficients[name], rel_tol=1e-12):
            raise FileFormatError(
                f"{where}: coefficient {name} is {coefficients[name]!r} in the metadata but {value!r} in "
                "the tensors; the file was altered."
            )


def stored_report(path: str | os.PathLike) -> Report | None:
    """The report saved with the checkpoint (its numbers, figures and text), without rebuilding anything.

    None if the checkpoint holds no report (see ``info(path)["report_error"]``).
    """
    d = info(path)["report"]
    return None if d is None else Report.from_dict(d)


def info(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata (see the module docstring) plus ``format_version``, ``neuralflow_version``,
    ``torch_version`` and ``provenance`` (None for files written before it was recorded)."""
    _, header = _io.read(path, _KIND)
    versions = {k: header.get(k) for k in ("format_version", "neuralflow_version", "torch_version", "provenance")}
    return {**versions, **header["meta"]}


# ------------------------------------------------------------------------------- a simulation in progress

_SIMULATION_KIND = "simulation"


def save_simulation(path: str | os.PathLike, flow: Flow, t: float, state: Tensor) -> Path:
    """Write a flow in the middle of a simulation: its settings, the time ``t``, the ODE ``state`` (``theta``
    and any extra state, ``flow.join(theta, extra)``) and its warm tensors (``flow.warm_tensors()``).

    :func:`load_simulation` gives them back; ``simulate(flow, theta, t, extra0=extra, reset=False)`` from them
    continues exactly where the saved run was (same file format and checks as a fit's checkpoint).
    """
    _registered(FLOWS, flow, "flow")
    if state.dim() != 1 or state.shape[0] != flow.state_dim:
        raise InputError(
            f"save_simulation: state must be one ODE state of length {flow.state_dim}, got {tuple(state.shape)}."
        )
    tensors = {"state": state, **{f"warm.{k}": v for k, v in flow.warm_tensors().items()}}
    meta = {
        "problem": flow.problem.description,
        "flow": flow.config(),
        "t": float(t),
        "check": {"first_loss": float(flow.problem.loss(flow.split(state)[0].detach()))},
    }
    return _io.write(path, _SIMULATION_KIND, tensors, meta)


def load_simulation(
    path: str | os.PathLike,
    problem: Problem | None = None,
    device: torch.device | str | None = None,
    max_params: int | None = MAX_PARAMS,
    allow_code: bool = False,
) -> tuple[Flow, float, Tensor, Tensor | None]:
    """Read a file written by :func:`save_simulation`: ``(flow, t, theta, extra)``, the flow's warm state restored.

    ``problem``, ``device``, ``max_params`` and ``allow_code`` as in :func:`load`."""
    tensors, header = _io.read(path, _SIMULATION_KIND)
    meta, where = header["meta"], str(path)
    try:
        problem = _problem(meta, problem, device, where, max_params, allow_code)
        flow = _build(FLOWS, meta["flow"], problem, "flow", where)
        state = tensors.pop("state").to(problem.device)
        t = float(meta["t"])
        recorded = float(meta["check"]["first_loss"])
    except KeyError as exc:
        raise FileFormatError(f"{where}: the metadata lacks {exc}; the file is damaged.") from None
    if state.shape != (flow.state_dim,):
        raise FileFormatError(
            f"{where}: the stored state has length {state.shape[0]} but the flow's is {flow.state_dim}."
        )
    theta, extra = flow.split(state)
    now = float(problem.loss(theta))
    if not math.isclose(recorded, now, rel_tol=_CHECK_RTOL, abs_tol=1e-300):
        raise InputError(
            f"{where}: the problem gives loss {now:.12g} at the saved state but the file recorded "
            f"{recorded:.12g}; pass the problem the simulation ran on."
        )
    flow.load_warm_tensors({k.removeprefix("warm."): v for k, v in tensors.items()})
    return flow, t, theta, extra
