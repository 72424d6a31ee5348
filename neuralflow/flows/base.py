"""Base class of the physics flows and the record of an approximation.

Every flow is a ``torch.nn.Module`` whose ``forward(t, theta)`` is the right-hand side of an ODE
in step time (iterate ``k`` of GD sits at ``t = k``), usable by torchdiffeq as it is. ``theta``
is one state ``(d,)`` or a batch ``(B, d)``; the output has the same shape. When ``theta``
requires grad, the output is a differentiable function of it (the adjoint method's
vector-Jacobian products go through ``torch.autograd``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..autodiff import StateDerivatives
from ..errors import InputError
from ..problems import Problem, check_lr
from .approximations import Approximation

__all__ = ["Approximation", "ExtraState", "Flow"]


@dataclass(frozen=True)
class ExtraState:
    """State a flow carries beside ``theta`` (the oscillation covariance; later momentum, Adam's moments).

    ``name`` a slug, ``symbol`` its letter in the equations, ``shape`` its shape for one trajectory,
    ``statement`` what it is. The ODE state of such a flow is the flat vector ``[theta, extra.flatten()]``
    (``Flow.join`` / ``Flow.split``); ``Flow.initial_extra`` says how it starts from a trajectory.
    """

    name: str
    symbol: str
    shape: tuple[int, ...]
    statement: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Flow(torch.nn.Module):
    """An ODE model of GD on ``problem`` with step size ``lr``, in step time.

    Subclasses set ``name`` (the registry key), ``latex`` and ``approximations``, and implement
    :meth:`vector_field` on a batch of states.
    """

    name: str = "flow"
    #: The right-hand side ``dtheta/dt`` in LaTeX math, step time, ``\eta`` for ``lr`` (the report's corrected ODE).
    latex: str = ""
    approximations: tuple[Approximation, ...] = ()
    extra_state: ExtraState | None = None

    def __init__(self, problem: Problem, lr: float) -> None:
        super().__init__()
        if not isinstance(problem, Problem):
            raise InputError(
                f"{type(self).__name__}: problem must be a neuralflow Problem, got {type(problem).__name__}."
            )
        self.problem = problem
        self.lr = check_lr(lr)

    @classmethod
    def from_trajectory(cls, problem: Problem, trajectory: Any, **options: Any) -> Flow:
        """The flow for a recorded run: at its ``lr``, with what else the flow takes from a run (its noise, for
        the oscillation flow); ``options`` go to the constructor and win."""
        return cls(problem, trajectory.lr, **options)

    @classmethod
    def latex_of(cls, **options: Any) -> str:
        """:attr:`latex` of the flow the constructor ``options`` would build, without building one (the report
        knows a flow by its registry name only)."""
        return cls.latex

    def forward(self, t: Tensor, theta: Tensor) -> Tensor:
        self.problem.check_theta(theta, "state")
        batch = theta if theta.dim() == 2 else theta.unsqueeze(0)
        create_graph = torch.is_grad_enabled() and batch.requires_grad
        out = self.vector_field(t, StateDerivatives(self.problem, batch, create_graph))
        return out if theta.dim() == 2 else out[0]

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        """``dtheta/dt`` for each state of ``state.thetas`` (shape ``(B, d)``)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget warm state kept between evaluations before integrating a new trajectory (none by default)."""

    # ------------------------------------------------------------------ states beyond theta
    @property
    def state_dim(self) -> int:
        """Length of the ODE state: ``d``, plus the extra state's size for a flow that carries one."""
        return self.problem.dim + (0 if self.extra_state is None else self.extra_state.size)

    def split(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(theta, extra)`` of ODE states ``y`` (``(..., state_dim)``); ``extra`` has the extra state's shape."""
        d = self.problem.dim
        if self.extra_state is None:
            return y, None
        return y[..., :d], y[..., d:].reshape(*y.shape[:-1], *self.extra_state.shape)

    def join(self, theta: Tensor, extra: Tensor | None) -> Tensor:
        """The ODE state ``[theta, extra.flatten()]`` (``theta`` alone for a flow without extra state)."""
        if self.extra_state is None:
            if extra is not None:
                raise InputError(f"{type(self).__name__} carries no state beyond theta; pass no extra state.")
            return theta
        shape = self.extra_state.shape
        if extra is None or tuple(extra.shape[-len(shape) :]) != shape:
            raise InputError(
                f"{type(self).__name__}: the extra state {self.extra_state.name!r} must have shape {shape}, got "
                f"{None if extra is None else tuple(extra.shape)}."
            )
        return torch.cat([theta, extra.reshape(*theta.shape[:-1], -1).to(theta)], dim=-1)

    def initial_extra(self, theta0: Tensor, trajectory: object = None, step: int | None = None) -> Tensor | None:
        """The extra state at ``theta0``, from ``trajectory``'s measurement at ``step`` (default its first step)."""
        return None

    def hidden_coefficients(self) -> dict[str, float]:
        """The flow's own coefficient of each hidden-state term it can evaluate
        (:data:`~neuralflow.corrections.HIDDEN_TERMS`), by name; empty for a flow without extra state."""
        return {}

    def hidden_fields(self, t: Tensor, y: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The flow's right-hand side on ODE states ``y`` ``(B, state_dim)`` and the unit-coefficient field of each
        named hidden-state term there (each ``(B, state_dim)``), from one evaluation."""
        raise InputError(f"{type(self).__name__} has no hidden-state terms; it carries no state beyond theta.")

    def rebase(self, y: Tensor) -> Tensor:
        """Re-express the extra state between two output times (e.g. in a rotated basis); identity by default."""
        return y

    def warm_tensors(self) -> dict[str, Tensor]:
        """What the flow carries between evaluations besides the ODE state (warm starts, the basis of the extra
        state), by name; with :meth:`load_warm_tensors` a saved simulation resumes exactly. Empty by default."""
        return {}

    def load_warm_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`warm_tensors` returned."""
        if tensors:
            raise InputError(f"{type(self).__name__} keeps no warm state; got tensors {sorted(tensors)}.")

    def config(self) -> dict[str, object]:
        """JSON-able settings that rebuild this flow on the same problem (for checkpoints)."""
        return {"name": self.name, "lr": self.lr}

    def extra_repr(self) -> str:
        return f"problem={self.problem.name!r}, lr={self.lr:g}"
