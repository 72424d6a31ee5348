"""Gradient flow, the stable flow of Cohen et al., ICLR 2025."""

from __future__ import annotations

from torch import Tensor

from ..autodiff import StateDerivatives
from .approximations import CONTINUOUS_TIME_1, NO_OSCILLATION
from .base import Flow

__all__ = ["GradientFlow", "CONTINUOUS_TIME_1", "NO_OSCILLATION"]


class GradientFlow(Flow):
    """``dtheta/dt = -lr g`` (step time): GD's continuous-time limit.

    Parameters
    ----------
    problem : Problem
        The loss GD runs on.
    lr : float
        GD's step size; time is in steps (iterate ``k`` at ``t = k``).

    Raises
    ------
    InputError
        When ``problem`` is not a :class:`~neuralflow.problems.Problem` or ``lr`` is not positive and finite.

    Examples
    --------
    >>> import torch, neuralflow as nf
    >>> problem = nf.problems.quadratic([[1.0, 0.0], [0.0, 10.0]])
    >>> flow = nf.GradientFlow(problem, lr=0.1)
    >>> flow(torch.tensor(0.0), problem.theta0).tolist()
    [-0.1, -1.0]
    """

    name = "gradient"
    latex = r"-\eta\,g"
    approximations = (CONTINUOUS_TIME_1, NO_OSCILLATION)

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        return state.out(-self.lr * state.g)
