"""Gradient flow, the stable flow of Cohen et al., ICLR 2025."""

from __future__ import annotations

from torch import Tensor

from ..autodiff import StateDerivatives
from .approximations import CONTINUOUS_TIME_1, NO_OSCILLATION
from .base import Flow

__all__ = ["GradientFlow", "CONTINUOUS_TIME_1", "NO_OSCILLATION"]


class GradientFlow(Flow):
    """``dtheta/dt = -lr g`` (step time): GD's continuous-time limit."""

    name = "gradient"
    latex = r"-\eta\,g"
    approximations = (CONTINUOUS_TIME_1, NO_OSCILLATION)

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        return state.out(-self.lr * state.g)
