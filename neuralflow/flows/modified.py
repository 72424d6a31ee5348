"""Modified flows: backward error analysis of GD to first and second order.

GD is explicit Euler with unit step on ``dtheta/dt = -lr g``. Its modified equation (Hairer,
Lubich, Wanner, *Geometric Numerical Integration*, ch. IX, with ``f = -lr g``,
``f2 = -1/2 f'f``, ``f3 = 1/3 f'f'f + 1/12 f''(f, f)``) is, in step time,

    dtheta/dt = -lr g - 1/2 lr^2 H g - lr^3 [1/3 H^2 g + 1/12 D3L[g, g]] + O(lr^4).

The first-order flow is the gradient flow of ``L + (lr/4) ||g||^2`` (Barrett & Dherin,
Implicit Gradient Regularization, ICLR 2021); the second-order term is not a gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..autodiff import StateDerivatives
from ..errors import InputError
from ..problems import Problem
from .approximations import CONTINUOUS_TIME_2, CONTINUOUS_TIME_3, NO_OSCILLATION
from .base import Flow

__all__ = ["ModifiedFlow", "CONTINUOUS_TIME_2", "CONTINUOUS_TIME_3"]


class ModifiedFlow(Flow):
    """The modified equation of GD truncated at ``order`` 1 or 2, in step time.

    ``order=1``: ``dtheta/dt = -lr g - 1/2 lr^2 H g`` (needs a twice differentiable loss).
    ``order=2``: adds ``-lr^3 [1/3 H^2 g + 1/12 D3L[g, g]]`` (needs third derivatives).
    ``D3L[g, g]`` comes from ``grad (g^T H g) = 2 H^2 g + D3L[g, g]``, so one forward costs a
    gradient, two Hessian-vector products and one more double-backward, all differentiable
    again (``StateDerivatives``). Over a fixed original time ``k lr`` its distance to GD shrinks
    like ``lr^(order + 1)`` (Hairer, Lubich, Wanner, ch. IX).

    Parameters
    ----------
    problem : Problem
        The loss GD runs on.
    lr : float
        GD's step size; time is in steps (iterate ``k`` at ``t = k``).
    order : int, default 1
        The truncation: 1 or 2.

    Raises
    ------
    InputError
        When ``order`` is not 1 or 2, or the loss is not smooth enough for it (a ReLU net).
    """

    name = "modified"
    #: The right-hand side in LaTeX by order.
    LATEX = {
        1: r"-\eta\,g-\frac{1}{2}\eta^{2}H g",
        2: r"-\eta\,g-\frac{1}{2}\eta^{2}H g-\eta^{3}\left(\frac{1}{3}H^{2}g+\frac{1}{12}D^{3}L[g,g]\right)",
    }
    latex = LATEX[1]

    def __init__(self, problem: Problem, lr: float, order: int = 1) -> None:
        super().__init__(problem, lr)
        if isinstance(order, bool) or order not in (1, 2):
            raise InputError(
                f"ModifiedFlow: order must be 1 or 2 (the truncation of the modified equation), got {order!r}."
            )
        needs, ok = ("third", problem.thrice_differentiable) if order == 2 else ("second", problem.twice_differentiable)
        if not ok:
            raise InputError(
                f"ModifiedFlow(order={order}) needs {needs} derivatives of the loss, but problem "
                f"{problem.name!r} is not smooth enough (e.g. a ReLU net); use a smooth activation "
                f"(tanh, gelu, softplus) or a lower order."
            )
        self.order = order
        self.name = f"modified{order}"
        self.latex = self.latex_of(order=order)
        dropped = CONTINUOUS_TIME_2 if order == 1 else CONTINUOUS_TIME_3
        self.approximations = (dropped, NO_OSCILLATION)

    @classmethod
    def latex_of(cls, order: int = 1, **options: Any) -> str:
        return cls.LATEX[order]

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        lr, g = self.lr, state.g
        hg = state.hvp(g)
        out = -lr * g - 0.5 * lr**2 * hg
        if self.order == 2:
            h2g = state.hvp(hg)
            with torch.enable_grad():  # grad (g^T H g) = 2 H^2 g + D3L[g, g]
                d3gg = state.grad_of((g * hg).sum(dim=1)) - 2 * h2g
            out = out - lr**3 * (h2g / 3 + d3gg / 12)
        return state.out(out)
