"""Several runs' objectives over one shared parameter vector, and the runs' models at their own lr."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..autodiff import top_eigenpairs
from ..corrections import CORRECTIONS, Hybrid, TermLibrary
from ..flows import FLOWS
from ..trajectory import Trajectory
from .shooting import _Objective

# ===================================================================================================
# Fit across several runs (issue 16): one set of constant coefficients shared by trajectories at
# different learning rates, each run with its own physics at its own lr.
# ===================================================================================================
_UNIVERSAL_Z = 3.0  # a per-run coefficient further than this many combined errors from the joint one is not universal


class _JointObjective:
    """Several runs' objectives over one shared parameter vector: residuals and sensitivities stacked.

    Offers what :func:`_optimise` uses of an :class:`_Objective`. Each run's residuals are normalised by
    its own displacement, then weighted by ``weights`` (see :func:`fit_runs`).
    """

    def __init__(self, objectives: list[_Objective], weights: list[float]) -> None:
        self.objectives = objectives
        self.model = objectives[0].model  # the first run's: its coefficients are every run's
        self.scales = [math.sqrt(w) for w in weights]
        self.params = objectives[0].params  # the same Parameter objects in every run's model
        self.last_jacobian: Tensor | None = None
        self._sizes: list[int] = []

    @property
    def counted(self) -> Any:
        return type("Count", (), {"n": sum(o.counted.n for o in self.objectives)})

    @property
    def val_loss(self) -> float:
        values = [o.val_loss for o in self.objectives if math.isfinite(o.val_loss)]
        return sum(values) / len(values) if values else math.nan

    def get(self) -> Tensor:
        return self.objectives[0].get()

    def set(self, vec: Tensor) -> None:
        self.objectives[0].set(vec)

    def residuals(self, grad: bool) -> Tensor:
        parts = [a * o.residuals(grad) for o, a in zip(self.objectives, self.scales, strict=True)]
        self._sizes = [len(p) for p in parts]
        return torch.cat(parts)

    def split(self, r: Tensor) -> list[Tensor]:
        return list(torch.split(r, self._sizes))

    def jacobian(self, base: Tensor, r0: Tensor) -> Tensor:
        parts = [
            a * o.jacobian(base, r / a) for o, a, r in zip(self.objectives, self.scales, self.split(r0), strict=True)
        ]
        self.last_jacobian = torch.cat(parts)
        return self.last_jacobian

    def loss_and_grad(self) -> tuple[float, Tensor]:
        parts = [o.loss_and_grad() for o in self.objectives]
        grads = [a * a * p[1] for a, p in zip(self.scales, parts, strict=True)]
        return sum((a * a * p[0] for a, p in zip(self.scales, parts, strict=True)), 0.0), sum(grads[1:], grads[0])


def _at_lr(model: Hybrid, lr: float, share: bool) -> Hybrid:
    """``model``'s physics and library rebuilt at ``lr``; ``share=True`` ties the coefficients to ``model``'s."""

    def rebuild(registry: dict[str, Any], part: Any) -> Any:
        cfg = dict(part.config())
        name = cfg.pop("name")
        cfg.pop("lr")
        return registry[name](model.problem, lr, **cfg)

    shared = model.correction
    assert isinstance(shared, TermLibrary)  # fit_runs fits the constants of a term library
    library = rebuild(CORRECTIONS, shared)
    if share:
        library.constants = shared.constants
    else:
        with torch.no_grad():
            for name, c in shared.constants.items():
                library.constants[name].copy_(c)
    return Hybrid(rebuild(FLOWS, model.flow), library)


def _truncation_allowance(model: Hybrid, trajectory: Trajectory) -> float:
    """``lr S``: the relative size of the modified-equation terms a constant-coefficient library omits.

    A term carrying ``lr^p`` absorbs the omitted ``O(lr^{p+1})`` terms, which are ``lr S`` times smaller
    (``S`` the largest sharpness the run measured, else the sharpness at its first iterate).
    """
    s = trajectory.history.get("sharpness", trajectory.sharpness)
    s = s[torch.isfinite(s)]
    if len(s):
        sharpness = float(s.max())
    else:
        theta = trajectory.iterates[0].to(dtype=model.problem.dtype, device=model.problem.device)
        sharpness = float(top_eigenpairs(model.problem, theta, k=1).values[0])
    return trajectory.lr * abs(sharpness)
