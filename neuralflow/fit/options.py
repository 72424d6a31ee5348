"""The fit's fixed choices (solvers, optimisers, limits) and the checks of its inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..corrections import Hybrid
from ..errors import InputError
from ..problems import Problem
from ..solvers import FIXED_GRID, Solver
from ..trajectory import Trajectory

_OPTIMIZERS = ("auto", "gauss-newton", "lbfgs", "adam")
_DEFAULT_ITERS = {"gauss-newton": 20, "lbfgs": 100, "adam": 500}
_SWITCH_OPEN = 0.01  # a gate whose switch stays below this at every point counts as off
_GN_MAX_PARAMS = 64  # finite-difference sensitivities cost one solve per parameter
_GATED_REGRESSION_ITERS = 200  # LBFGS iterations of the gated regression (precomputed tensors, no solves)


@dataclass(frozen=True)
class ShootingOptions:
    """What defines the shooting windows and their loss, shared by :func:`~neuralflow.fit.fit`,
    :func:`~neuralflow.fit.fit_loss` and the fit over several runs (each field is the keyword of the same name of
    :func:`~neuralflow.fit.fit`, which documents it); checked when the windows are set up."""

    window: int = 20
    target: str = "iterates"
    method: str = "adjoint"
    min_norm: float = 1e-4
    val_fraction: float = 0.2
    stride: int | None = None
    seed: int = 0
    solver: str | None = None
    step_size: float | None = None
    rtol: float = 1e-7
    atol: float = 1e-9
    exclude: Sequence[Sequence[int | None]] | None = ()
    extra_start: str = "measured"
    variance_weight: float = 0.0

    @classmethod
    def pick(cls, options: dict[str, Any]) -> ShootingOptions:
        """The shooting options among ``options`` (a fit's keywords); the others are left to the caller."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


def resolved_solver(settings: dict[str, Any]) -> Solver:
    """The :class:`~neuralflow.solvers.Solver` a fit used, from its ``FitResult.settings`` (those of old checkpoints
    too): the ``solver`` (default rk4) at the step size it chose (``step_size_used``, else the ``step_size`` given,
    else 1/2), or at the tolerances it recorded."""
    method = settings.get("solver", "rk4")
    step = settings.get("step_size_used") or settings.get("step_size") or 0.5
    tolerances = {k: settings[k] for k in ("rtol", "atol") if k in settings}
    return Solver(method, float(step) if method in FIXED_GRID else None, **tolerances)


def _default_step_size(trajectory: Trajectory) -> float:
    """RK4 substep: ``1/n`` steps with ``lr * S / n <= 0.25`` (4 substeps at the edge of stability)."""
    s = trajectory.history.get("sharpness", trajectory.sharpness)
    s = s[torch.isfinite(s)]
    if len(s) == 0:
        return 0.5
    return 1.0 / max(1, math.ceil(trajectory.lr * float(s.max()) / 0.25))


def _check_inputs(model: Hybrid, trajectory: object, target: str, method: str) -> Trajectory:
    if not isinstance(model, Hybrid):
        raise InputError(
            f"fit: model must be an nf.Hybrid(flow, correction), got {type(model).__name__}; wrap a physics flow "
            "with nf.Hybrid(flow, correction) (or nf.Hybrid(flow, None) for the physics alone)."
        )
    if not isinstance(trajectory, Trajectory):
        raise InputError(f"fit: trajectory must be an nf.Trajectory (from run_gd), got {type(trajectory).__name__}.")
    problem = model.problem
    if trajectory.dim != problem.dim:
        raise InputError(
            f"fit: the trajectory has {trajectory.dim} parameters but the model's problem {problem.name!r} has "
            f"{problem.dim}; fit the trajectory with a model built on the problem that produced it."
        )
    if abs(trajectory.lr - model.lr) > 1e-9 * model.lr:
        raise InputError(
            f"fit: the trajectory was run with lr={trajectory.lr:g} but the model uses lr={model.lr:g}; build the "
            "flow and the correction with the trajectory's lr."
        )
    name = trajectory.problem.get("name")
    if name is not None and name != problem.name:
        raise InputError(f"fit: the trajectory comes from problem {name!r} but the model is built on {problem.name!r}.")
    _check_first_loss(problem, trajectory)
    if target not in ("iterates", "smoothed"):
        raise InputError(f"fit: target must be 'iterates' or 'smoothed', got {target!r}.")
    if method not in ("adjoint", "direct", "regression"):
        raise InputError(f"fit: method must be 'adjoint', 'direct' or 'regression', got {method!r}.")
    if model.extra_state is not None and method == "regression":
        raise InputError(
            f"fit: method='regression' reads derivatives of theta alone, but the {model.flow.name} flow carries "
            f"{model.extra_state.name}; use method='adjoint' or 'direct'."
        )
    bad = ~torch.isfinite(trajectory.iterates).all(dim=1)
    if bool(bad.any()):
        step = int(trajectory.steps[bad.nonzero()[0, 0]])
        raise InputError(
            f"fit: the trajectory's iterates are not finite from step {step} on; fit the finite part, e.g. "
            f"trajectory.slice(stop={step})."
        )
    trajectory = trajectory.on_grid()  # windows and derivative stencils need evenly spaced iterates
    return trajectory if target == "iterates" else trajectory.smoothed()


def _check_first_loss(problem: Problem, trajectory: Trajectory) -> None:
    """The problem must reproduce the loss the trajectory recorded at its first iterate (same data, same net).

    Skipped where there is nothing to compare: a smoothed trajectory (its loss series is GD's, its
    iterates midpoints) or a recorded loss that is not finite.
    """
    recorded = float(trajectory.loss[0])
    if trajectory.meta.get("smoothed") or not math.isfinite(recorded):
        return
    with torch.no_grad():
        now = float(problem.loss(trajectory.iterates[0].to(device=problem.device, dtype=problem.dtype)))
    rtol = max(1e-9, 1e4 * torch.finfo(problem.dtype).eps)
    if not math.isclose(now, recorded, rel_tol=rtol, abs_tol=1e-300):
        raise InputError(
            f"fit: the model's problem gives loss {now:.12g} at the trajectory's first iterate but the trajectory "
            f"recorded {recorded:.12g}; the trajectory comes from another problem (other data or architecture). "
            "Build the model on the problem that produced the trajectory."
        )


def _check_exclude(exclude: Sequence[Sequence[int | None]] | None) -> list[list[int]]:
    """``exclude`` as a list of ``[start, stop]`` step ranges with ``start < stop`` (None: open end)."""
    ranges = []
    for r in list(exclude) if exclude is not None else []:
        try:
            lo, hi = r
            lo = -(2**62) if lo is None else int(lo)
            hi = 2**62 if hi is None else int(hi)
        except (TypeError, ValueError, OverflowError):
            raise InputError(
                f"fit: exclude must hold (start, stop) step pairs of ints (None for an open end), got {r!r}."
            ) from None
        if not lo < hi:
            raise InputError(f"fit: an excluded range needs start < stop, got ({lo}, {hi}).")
        ranges.append([lo, hi])
    return ranges
