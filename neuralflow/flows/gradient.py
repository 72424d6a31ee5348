"""Gradient flow, the stable flow of Cohen et al., ICLR 2025."""

from __future__ import annotations

from torch import Tensor

from ..autodiff import StateDerivatives
from .base import Approximation, Flow

CONTINUOUS_TIME_1 = Approximation(
    name="continuous-time-order-1",
    statement="GD's discrete steps are replaced by their continuous-time limit, dropping the "
    "first-order backward-error term -(1/2) lr^2 H g.",
    exact_when="lr -> 0, to O(lr^2) per step",
    revised_by=("Hg",),
    reference="Barrett & Dherin, Implicit Gradient Regularization, ICLR 2021; Hairer, Lubich, Wanner, ch. IX",
)

NO_OSCILLATION = Approximation(
    name="no-oscillation",
    statement="The iterates do not oscillate along the top Hessian eigenvector, so the "
    "oscillation's curvature-lowering drift -(1/2) lr sigma^2 grad S is absent.",
    exact_when="sharpness below 2/lr (the stable regime)",
    revised_by=("gradS", "gradScrit"),
    reference="Cohen, Damian, Talwalkar, Kolter, Lee, Understanding Optimization in Deep Learning with "
    "Central Flows, ICLR 2025",
)


class GradientFlow(Flow):
    """``dtheta/dt = -lr g`` (step time): GD's continuous-time limit."""

    name = "gradient"
    approximations = (CONTINUOUS_TIME_1, NO_OSCILLATION)

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        return state.out(-self.lr * state.g)
