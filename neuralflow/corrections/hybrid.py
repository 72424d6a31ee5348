"""The fitted model, physics plus correction (:class:`Hybrid`), and the registry of corrections by name
(:data:`CORRECTIONS`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..autodiff import StateDerivatives
from ..errors import InputError
from ..flows import FLOWS
from ..flows.approximations import (
    Approximation,
)
from ..flows.base import ExtraState, Flow
from .hidden import HiddenStateLibrary
from .library import TermLibrary
from .neural import LatentCorrection, NeuralCorrection
from .terms import Correction

CORRECTIONS: dict[str, type[Correction]] = {
    "term-library": TermLibrary,
    "neural": NeuralCorrection,
    "hidden-state": HiddenStateLibrary,
    "latent": LatentCorrection,
}


class Hybrid(Flow):
    """``dtheta/dt = F_p(theta) + F_a(theta)``: a physics flow plus a learnable correction.

    The ODE right-hand side handed to torchdiffeq. ``Hybrid(flow, None)`` is the physics alone.
    Both parts read one shared :class:`~neuralflow.autodiff.StateDerivatives` per evaluation.

    For a flow with extra state (``flow.extra_state``) the hybrid's ODE state is the flow's ``[theta, extra]``.
    A :class:`HiddenStateLibrary` then adds ``(c_j - p_j)`` times each of its terms' fields (the flow's
    :meth:`~neuralflow.flows.Flow.hidden_fields`); a :class:`TermLibrary` or :class:`NeuralCorrection` adds its
    field to ``dtheta/dt`` only, and the extra state follows the physics.

    A :class:`LatentCorrection` appends its latent states: the ODE state is ``[theta, flow extra (if any), z]``, and
    the hybrid's :attr:`extra_state` is everything after ``theta`` as one flat vector (``name`` ``"latent"`` or, on
    a flow with extra state, e.g. ``"covariance+latent"``); :meth:`split`, :meth:`join`, :meth:`initial_extra`
    (the flow's start, then ``z = 0``) and :meth:`rebase` cover it, so ``simulate``, ``compare``, ``fit`` and
    checkpoints need nothing else. :meth:`flow_part` gives the flow's own ODE state and ``z``.
    """

    name = "hybrid"

    def __init__(self, flow: Flow, correction: Correction | None = None) -> None:
        if not isinstance(flow, Flow) or isinstance(flow, Correction):
            raise InputError(
                f"Hybrid: flow must be a physics flow (one of {sorted(FLOWS)}), got {type(flow).__name__}."
            )
        if correction is not None:
            if not isinstance(correction, Correction):
                raise InputError(
                    "Hybrid: correction must be a TermLibrary, NeuralCorrection, HiddenStateLibrary or "
                    f"LatentCorrection (or None), got {type(correction).__name__}."
                )
            if correction.problem is not flow.problem:
                raise InputError("Hybrid: the flow and the correction must be built on the same Problem object.")
            if abs(correction.lr - flow.lr) > 1e-12 * flow.lr:
                raise InputError(f"Hybrid: the flow has lr={flow.lr:g} but the correction lr={correction.lr:g}.")
        if isinstance(correction, HiddenStateLibrary):
            supported = flow.hidden_coefficients()
            missing = [n for n in correction.terms if n not in supported]
            if missing:
                raise InputError(
                    f"Hybrid: the {flow.name} flow cannot evaluate the hidden-state terms {missing}"
                    + (
                        f"; it supports {sorted(supported)}."
                        if supported
                        else " (it carries no state beyond theta); use a flow with extra state, e.g. the "
                        "oscillation flow."
                    )
                )
            correction.start_from(flow)
        super().__init__(flow.problem, flow.lr)
        self.flow = flow
        self.correction = correction
        self.extra_state = flow.extra_state
        if isinstance(correction, LatentCorrection):
            own = flow.extra_state
            latent = correction.latent
            self.extra_state = (
                latent
                if own is None
                else ExtraState(
                    f"{own.name}+{latent.name}",
                    f"[{own.symbol}, {latent.symbol}]",
                    (own.size + latent.size,),
                    f"{own.statement}, flattened, then {latent.statement}",
                )
            )

    @property
    def approximations(self) -> tuple[Approximation, ...]:  # type: ignore[override]
        return tuple(self.flow.approximations)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        if self.extra_state is None:
            return super().forward(t, y)
        batch = y if y.dim() == 2 else y.unsqueeze(0)
        if batch.shape[-1] != self.state_dim:
            raise InputError(
                f"Hybrid: the {self.flow.name} flow's ODE state [theta, {self.extra_state.name}] has length "
                f"{self.state_dim}, got {batch.shape[-1]}; build it with model.join(theta, model.initial_extra(theta))."
            )
        lib = self.correction
        if isinstance(lib, LatentCorrection):
            head, z = self.flow_part(batch)
            assert z is not None  # a latent correction's states follow the flow's
            theta = head[:, : self.problem.dim]
            state = StateDerivatives(self.problem, theta, torch.is_grad_enabled() and batch.requires_grad)
            out = self.flow.vector_field(t, state) if self.flow.extra_state is None else self.flow(t, head)
            dtheta, dz = lib.latent_field(t, state, z)
            out = torch.cat([out[:, : self.problem.dim] + dtheta, out[:, self.problem.dim :], dz], dim=1)
        elif isinstance(lib, HiddenStateLibrary):
            out, fields = self.flow.hidden_fields(t, batch, lib.terms)
            own = self.flow.hidden_coefficients()
            for n, c in lib.coefficients(self.flow).items():
                out = out + (c - own[n]) * fields[n]
        else:
            out = self.flow(t, batch)
            if lib is not None:
                theta, extra = self.flow.split(batch)
                out = out + self.flow.join(lib(t, theta), None if extra is None else torch.zeros_like(extra))
        return out if y.dim() == 2 else out[0]

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        out = self.flow.vector_field(t, state)
        return out if self.correction is None else out + self.correction.vector_field(t, state)

    def flow_part(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(flow state, z)`` of ODE states ``y`` ``(..., state_dim)``: the flow's own ``[theta, extra]`` and the
        latent states of a :class:`LatentCorrection` (None for any other correction)."""
        if not isinstance(self.correction, LatentCorrection):
            return y, None
        n = self.flow.state_dim
        return y[..., :n], y[..., n:]

    def initial_extra(self, theta0: Tensor, trajectory: object = None, step: int | None = None) -> Tensor | None:
        """The flow's extra state at ``theta0`` (its measurement in ``trajectory`` at ``step``), then, for a
        :class:`LatentCorrection`, ``z = 0``: nothing is measured about the latent states (``fit`` can fit their
        start per window instead, ``extra_start="fitted"``)."""
        own = self.flow.initial_extra(theta0, trajectory, step)
        if not isinstance(self.correction, LatentCorrection):
            return own
        z = theta0.new_zeros(self.correction.m)
        return z if own is None else torch.cat([own.reshape(-1).to(z), z])

    def rebase(self, y: Tensor) -> Tensor:
        head, z = self.flow_part(y)
        head = self.flow.rebase(head)
        return head if z is None else torch.cat([head, z], dim=-1)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flow": self.flow.config(),
            "correction": None if self.correction is None else self.correction.config(),
        }
