"""The principal flow of GD (Rosca, Wu, Qin, Dherin 2023).

On a quadratic, GD multiplies the component along each Hessian eigenvector ``u_i`` by
``1 - lr lambda_i`` per step; the flow whose unit-time map does the same is, in step time,

    dtheta/dt = sum_i [log(1 - lr lambda_i) / lambda_i] (u_i . g) u_i,

whose series ``-lr g - lr^2/2 H g - lr^3/3 H^2 g - ...`` matches GD's modified equation but drops
every ``D3L`` term. For ``lr lambda_i > 1`` the logarithm is complex (its imaginary part is the
period-2 flip); this flow keeps the real part ``log|1 - lr lambda_i|``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autodiff import StateDerivatives, top_eigenpairs
from ..errors import InputError
from ..problems import Problem
from .approximations import NO_THIRD_DERIVATIVES, REAL_PART, UNRESOLVED_GRADIENT_FLOW
from .base import Flow

__all__ = ["PrincipalFlow", "principal_rate", "NO_THIRD_DERIVATIVES", "REAL_PART", "UNRESOLVED_GRADIENT_FLOW"]

_DENSE_LIMIT = 2000


def principal_rate(lam: Tensor, lr: float) -> Tensor:
    """``log|1 - lr lambda| / lambda``, the step-time rate along an eigenvector (``-lr`` at ``lambda = 0``).

    Uses the series ``-lr (1 + x/2 + x^2/3 + x^3/4)``, ``x = lr lambda``, for ``|x| < 1e-3`` and keeps
    both branches finite so that autograd through ``torch.where`` stays finite.
    """
    x = lr * lam
    small = x.abs() < 1e-3
    x_safe = torch.where(small, torch.full_like(x, 0.5), x)
    gap = (1 - x_safe).abs().clamp_min(torch.finfo(lam.dtype).tiny)
    exact = torch.log(gap) / (x_safe / lr)
    series = -lr * (1 + x / 2 + x**2 / 3 + x**3 / 4)
    return torch.where(small, series, exact)


class PrincipalFlow(Flow):
    """``dtheta/dt = sum_i [log|1 - lr lambda_i| / lambda_i] (u_i . g) u_i`` (step time, real part).

    ``k=None``: every eigenpair, from a dense ``eigh`` of the Hessian built from ``d``
    Hessian-vector products (small problems only, ``d <= 2000``); the flow then reproduces GD
    at integer times on a quadratic while ``lr lambda_max < 1``. Derivatives through ``eigh``
    are exact for distinct eigenvalues and undefined where two eigenvalues coincide.

    ``k`` an int: only the top-``k`` eigenpairs (largest algebraic, warm-started LOBPCG from
    ``autodiff.top_eigenpairs``, tolerance ``eig_tol``) are resolved; in the complement the flow
    is gradient flow, ``-lr (g - sum_i (u_i . g) u_i)``. The eigenvectors are computed outside
    the autograd graph, so the Jacobian of ``forward`` includes the change of ``g`` and of the
    Rayleigh quotients ``lambda_i = u_i^T H u_i`` but neglects the rotation of the ``u_i``.

    Parameters
    ----------
    problem : Problem
        The loss GD runs on.
    lr : float
        GD's step size; time is in steps (iterate ``k`` at ``t = k``).
    k : int, optional
        Resolve only the top ``k`` eigenpairs (gradient flow in their complement); None: every eigenpair, from a
        dense ``eigh`` (at most 2000 parameters).
    eig_tol : float, default 1e-6
        LOBPCG's relative residual for the top-``k`` eigenpairs (unused with ``k=None``).

    Raises
    ------
    InputError
        When the loss is not twice differentiable, ``k`` is not None or an int in ``[1, d]``, or ``k=None`` on a
        problem of more than 2000 parameters.
    """

    name = "principal"
    latex = r"\sum_i\frac{\log(1-\eta\lambda_i)}{\lambda_i}(u_i\cdot g)\,u_i"

    def __init__(self, problem: Problem, lr: float, k: int | None = None, eig_tol: float = 1e-6) -> None:
        super().__init__(problem, lr)
        if not problem.twice_differentiable:
            raise InputError(
                f"PrincipalFlow needs the Hessian of the loss, but problem {problem.name!r} is not twice "
                "differentiable (e.g. a ReLU net); use a smooth activation."
            )
        if k is None and problem.dim > _DENSE_LIMIT:
            raise InputError(
                f"PrincipalFlow: problem {problem.name!r} has {problem.dim} parameters, too many for a dense "
                f"eigendecomposition (at most {_DENSE_LIMIT}); pass k (e.g. k=10) to resolve the top-k eigenspace."
            )
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= problem.dim):
            raise InputError(f"PrincipalFlow: k must be None or an int in [1, {problem.dim}], got {k!r}.")
        self.k = k
        self.eig_tol = eig_tol
        self._blocks: dict[int, Tensor] = {}
        self.approximations = (NO_THIRD_DERIVATIVES, REAL_PART) + (() if k is None else (UNRESOLVED_GRADIENT_FLOW,))

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        g = state.g
        if self.k is None:
            eye = torch.eye(self.problem.dim, dtype=g.dtype, device=g.device)
            hess = torch.stack([state.hvp(e.expand_as(g)) for e in eye], dim=2)  # (B, d, d), column i = H e_i
            lam, vecs = torch.linalg.eigh(0.5 * (hess + hess.transpose(1, 2)))
            coef = principal_rate(lam, self.lr) * torch.einsum("bdi,bd->bi", vecs, g)
            return state.out(torch.einsum("bdi,bi->bd", vecs, coef))
        k = self.k
        U = torch.stack([self._eigenvectors(b, theta, k) for b, theta in enumerate(state.thetas.detach())])  # (B,k,d)
        hu = torch.stack([state.hvp(U[:, i]) for i in range(k)], dim=1)
        lam = (U * hu).sum(dim=2)
        ug = torch.einsum("bkd,bd->bk", U, g)
        resolved = torch.einsum("bk,bkd->bd", (principal_rate(lam, self.lr) + self.lr) * ug, U)
        return state.out(resolved - self.lr * g)

    def _eigenvectors(self, index: int, theta: Tensor, k: int) -> Tensor:
        res = top_eigenpairs(self.problem, theta, k=k, v0=self._blocks.get(index), tol=self.eig_tol)
        self._blocks[index] = res.block
        return res.vectors

    def config(self) -> dict[str, object]:
        return {**super().config(), "k": self.k, "eig_tol": self.eig_tol}
