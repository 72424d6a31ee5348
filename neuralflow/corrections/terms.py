"""Candidate terms and state features (the registries :data:`TERMS`, :data:`FEATURES`), the shared derivative context
and the :class:`Correction` base class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor

from ..autodiff import StateDerivatives, top_eigenpairs
from ..errors import InputError
from ..flows.approximations import (
    CONTINUOUS_TIME_1,
    CONTINUOUS_TIME_2,
    EFFECTIVE_STEP_SIZE,
    NO_OSCILLATION,
    NO_OSCILLATION_CRITICAL,
    SLAVED_TOP_DIRECTION,
    Approximation,
)
from ..flows.base import Flow
from ..problems import Problem, check_positive_int


class _Factory(TypedDict):
    """The keyword arguments that put a new tensor or layer on a problem's dtype and device."""

    dtype: torch.dtype
    device: torch.device


class _Context:
    """Derivatives shared by the terms and features of one evaluation on a batch of states.

    Quantities are computed on first use and kept, so ``g``, ``H g`` and the top eigenpairs are
    evaluated once however many terms need them. Eigenvectors are computed outside the graph
    (held fixed), so ``u^T H u`` is a differentiable sharpness whose gradient is ``D3L[u, u]``.
    """

    def __init__(self, owner: Correction, state: StateDerivatives) -> None:
        self.owner = owner
        self.state = state
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            with torch.enable_grad():  # products of derivatives must stay in the graph for grad_of
                self._cache[key] = compute()
        return self._cache[key]

    @property
    def g(self) -> Tensor:
        return self.state.g

    @property
    def Hg(self) -> Tensor:
        return self._get("Hg", lambda: self.state.hvp(self.g))

    @property
    def H2g(self) -> Tensor:
        return self._get("H2g", lambda: self.state.hvp(self.Hg))

    @property
    def D3gg(self) -> Tensor:
        # grad (g^T H g) = 2 H^2 g + D3L[g, g]
        return self._get("D3gg", lambda: self.state.grad_of((self.g * self.Hg).sum(1)) - 2 * self.H2g)

    def eigen(self, k: int) -> tuple[Tensor, Tensor]:
        """Top ``k`` eigenvalues ``(B, k)`` and unit eigenvectors ``(B, k, d)``, detached."""
        return self._get(f"eigen{k}", lambda: self.owner._eigenpairs(self.state.thetas, k))

    def rayleigh(self, k: int) -> Tensor:
        """``u_j^T H u_j`` for the top ``k`` eigenvectors held fixed, ``(B, k)``, differentiable."""

        def compute() -> Tensor:
            _, vecs = self.eigen(k)
            return torch.stack([(vecs[:, j] * self.state.hvp(vecs[:, j])).sum(1) for j in range(k)], dim=1)

        return self._get(f"rayleigh{k}", compute)

    @property
    def S(self) -> Tensor:
        """Sharpness ``S = u^T H u`` per state ``(B,)``; its gradient is ``grad S = D3L[u, u]``."""
        return self.rayleigh(1)[:, 0]

    @property
    def gradS(self) -> Tensor:
        return self._get("gradS", lambda: self.state.grad_of(self.S))

    @property
    def gradScrit(self) -> Tensor:
        def compute() -> Tensor:
            k = min(self.owner.max_critical, self.owner.problem.dim)
            values, _ = self.eigen(k)
            critical = (values >= 1.95 / self.owner.lr).to(values.dtype)
            return self.state.grad_of((self.rayleigh(k) * critical).sum(1))

        return self._get("gradScrit", compute)

    @property
    def sigma2(self) -> Tensor:
        """Self-stabilisation variance ``2 alpha / beta = max(0, -2 <g, grad L> / ||grad L||^2)`` ``(B,)``, detached.

        ``L`` is the sum of the critical eigenvalues (the sharpness ``S`` where none is critical):
        the oscillation variance that stops ``L`` from rising (Damian, Nichani, Lee 2023; for one
        critical eigenvalue the central flow's ``sigma^2``, Cohen et al. 2025), held fixed in derivatives.
        """

        def compute() -> Tensor:
            grad = self.gradScrit.detach()
            none = grad.square().sum(1) == 0
            if bool(none.any()):
                grad = torch.where(none[:, None], self.gradS.detach(), grad)
            beta = grad.square().sum(1).clamp_min(torch.finfo(grad.dtype).tiny)
            return (-2 * (self.g.detach() * grad).sum(1) / beta).clamp_min(0)

        return self._get("sigma2", compute)

    @property
    def u_ug(self) -> Tensor:
        def compute() -> Tensor:
            u = self.eigen(1)[1][:, 0]
            return (u * self.g).sum(1, keepdim=True) * u

        return self._get("u_ug", compute)


@dataclass(frozen=True)
class TermSpec:
    r"""One candidate correction field ``lr^power * field(theta)`` (an entry of :data:`TERMS`).

    ``theory`` is the coefficient GD has in front of it (None where it depends on the problem);
    ``approximation`` is what a non-zero fitted coefficient says to revise; ``formula`` the field
    as a researcher writes it in plain text and ``latex`` in LaTeX math (``\eta`` for ``lr``; the report's
    corrected ODE, parsed by matplotlib's mathtext too); ``unit_field`` computes ``field`` (without the power of
    ``lr``) from the shared derivatives of one evaluation.
    """

    name: str
    power: int
    theory: float | None
    approximation: Approximation
    formula: str
    latex: str
    unit_field: Callable[[_Context], Tensor]

    def __call__(self, ctx: _Context) -> Tensor:
        """The unit-coefficient vector field ``lr^power * field`` on the context's states, ``(B, d)``."""
        return ctx.owner.lr**self.power * self.unit_field(ctx)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "power": self.power,
            "theory": self.theory,
            "formula": self.formula,
            "approximation": self.approximation.to_dict(),
        }


TERMS: dict[str, TermSpec] = {
    spec.name: spec
    for spec in (
        TermSpec("g", 1, 0.0, EFFECTIVE_STEP_SIZE, "lr g", r"\eta\,g", lambda c: c.g),
        TermSpec("Hg", 2, -1 / 2, CONTINUOUS_TIME_1, "lr^2 H g", r"\eta^{2}\,H g", lambda c: c.Hg),
        TermSpec("H2g", 3, -1 / 3, CONTINUOUS_TIME_2, "lr^3 H^2 g", r"\eta^{3}\,H^{2} g", lambda c: c.H2g),
        TermSpec("D3gg", 3, -1 / 12, CONTINUOUS_TIME_2, "lr^3 D3L[g, g]", r"\eta^{3}\,D^{3}L[g,g]", lambda c: c.D3gg),
        TermSpec("gradS", 1, None, NO_OSCILLATION, "lr grad S", r"\eta\,\nabla S", lambda c: c.gradS),
        TermSpec(
            "gradScrit",
            1,
            None,
            NO_OSCILLATION_CRITICAL,
            "lr grad sum_{lambda_i >= 1.95/lr} lambda_i",
            r"\eta\,\nabla\sum_{\lambda_i\geq 1.95/\eta}\lambda_i",
            lambda c: c.gradScrit,
        ),
        TermSpec("u_ug", 1, None, SLAVED_TOP_DIRECTION, "lr (u . g) u", r"\eta\,(u\cdot g)\,u", lambda c: c.u_ug),
    )
}
"""Candidate correction terms by name. Add a :class:`TermSpec` here to make a term available."""


@dataclass(frozen=True)
class FeatureSpec:
    """One scalar state feature ``x(theta)`` that gated coefficients and feature networks read (an entry of
    :data:`FEATURES`).

    ``text`` and ``latex`` write it (the report's gate formulas and axes); ``edge`` is the value where it crosses
    the edge of stability, ``lr S = 2`` (the knot of the report's gate basis; None for a feature with no such
    value); ``value`` computes it, ``(B,)``, from the shared derivatives of one evaluation.
    """

    name: str
    text: str
    latex: str
    edge: float | None
    value: Callable[[_Context], Tensor]

    def __call__(self, ctx: _Context) -> Tensor:
        """The feature on the context's states, ``(B,)``."""
        return self.value(ctx)


FEATURES: dict[str, FeatureSpec] = {
    spec.name: spec
    for spec in (
        FeatureSpec("lr_S_minus_2", "lr S - 2", r"\eta S-2", 0.0, lambda c: c.owner.lr * c.S - 2),
        FeatureSpec("lr_S", "lr S", r"\eta S", 2.0, lambda c: c.owner.lr * c.S),
        FeatureSpec("loss", "L", "L", None, lambda c: c.state.losses),
        FeatureSpec("sigma2", "sigma^2", r"\sigma^{2}", None, lambda c: c.sigma2),
    )
}
"""Scalar state features by name. Add a :class:`FeatureSpec` here to make a feature available."""


def _feature_matrix(ctx: _Context, names: Sequence[str]) -> Tensor:
    """The named :data:`FEATURES` of the context's states as columns, ``(B, len(names))``."""
    return torch.stack([FEATURES[n](ctx) for n in names], dim=1)


def _check_names(names: Sequence[str], known: dict[str, Any], what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown {what} {unknown}; known {what}s are {sorted(known)}.")
    if len(set(names)) != len(names):
        raise InputError(f"{what} names must not repeat, got {names}.")
    return names


class Correction(Flow):
    """Base class of learnable corrections: a vector field in step time on ``problem`` at ``lr``.

    Shares :meth:`Flow.forward` (states ``(d,)`` or ``(B, d)``, differentiable when the states
    require grad). Subclasses implement :meth:`vector_field` and :meth:`config`. Top
    eigenvectors, where needed, are found by warm-started LOBPCG per state, the warm start
    cached per batch size (the windows of a fit keep their batch positions between solves).
    """

    name = "correction"

    def __init__(self, problem: Problem, lr: float, max_critical: int = 4, eig_tol: float = 1e-6) -> None:
        super().__init__(problem, lr)
        check_positive_int(max_critical, "max_critical")
        self.max_critical = max_critical
        self.eig_tol = float(eig_tol)
        self._eig_blocks: dict[tuple[int, int], list[Tensor | None]] = {}
        self._eig_generator = torch.Generator(device=problem.device).manual_seed(0)

    def reset_cache(self) -> None:
        """Forget the eigenvector warm starts and reseed their random start (for reproducible fits)."""
        self._eig_blocks.clear()
        self._eig_generator.manual_seed(0)

    def _eigenpairs(self, thetas: Tensor, k: int) -> tuple[Tensor, Tensor]:
        blocks = self._eig_blocks.setdefault((thetas.shape[0], k), [None] * thetas.shape[0])
        values, vectors = [], []
        for b, theta in enumerate(thetas.detach()):
            res = top_eigenpairs(
                self.problem, theta, k=k, v0=blocks[b], tol=self.eig_tol, generator=self._eig_generator
            )
            blocks[b] = res.block
            values.append(res.values)
            vectors.append(res.vectors)
        return torch.stack(values), torch.stack(vectors)

    def _context(self, thetas: Tensor) -> _Context:
        """Shared derivatives of a ``(B, d)`` batch, detached from the states (for inspection)."""
        self.problem.check_theta(thetas, "states")
        if thetas.dim() != 2:
            raise InputError(f"expected a (B, {self.problem.dim}) batch of states, got shape {tuple(thetas.shape)}.")
        return _Context(self, StateDerivatives(self.problem, thetas, create_graph=False))
