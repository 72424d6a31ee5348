"""Derivatives every stage shares: gradient, Hessian-vector products, ``D3L``, top eigenpairs.

Conventions used throughout neuralflow: ``g = grad L``, ``H = hess L``, ``D3L[v, w] = grad_theta (v^T H w)``.
``H`` is never formed; Hessian-vector products are forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``) and batched over vectors with ``torch.func.vmap``.
Sums over the problem's parts (data chunks) are accumulated one part at a time.

Two families live here:

* functional, graph-free evaluations (:func:`gradient`, :func:`hvp`, :func:`d3`,
  :func:`top_eigenpairs`) for GD and eigen-solvers;
* :class:`StateDerivatives`, which evaluates ``g``, ``H v``, ... on a batch of states with
  ``torch.autograd.grad(create_graph=True)`` so that the result can be differentiated again,
  which is what the adjoint method needs: plain autograd, which is faster than ``torch.func`` transforms
  inside a differentiated graph (the README's measured results, *the experiment*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
from .problems import Problem

__all__ = [
    "gradient",
    "value_and_gradient",
    "Curvature",
    "hvp",
    "d3",
    "dense_hessian",
    "EigenResult",
    "top_eigenpairs",
    "align_signs",
    "StateDerivatives",
]


def _total(parts: list[Tensor]) -> Tensor:
    """The sum of the per-part Hessian-vector products, added in order (as the loss sums its parts)."""
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


class Curvature:
    """Loss, gradient and Hessian-vector products of a problem at one fixed point ``theta``.

    The gradient is built once with ``create_graph=True``; every Hessian-vector product is then
    one more backward pass through that graph (reverse-over-reverse), cheaper than ``torch.func.jvp`` of
    ``torch.func.grad`` (the README's measured results, *the experiment*; ``benchmarks/bench_gd.py``), so
    Krylov eigen-solvers reuse one ``Curvature`` for all their products. A problem split into several parts (data
    chunks) rebuilds each part's graph per product instead, keeping memory bounded.
    """

    def __init__(self, problem: Problem, theta: Tensor) -> None:
        self.problem = problem
        self.theta = theta.detach().requires_grad_(True)
        self.n_hvp = 0
        self._graph: Tensor | None = None
        value = torch.zeros((), dtype=theta.dtype, device=theta.device)
        grad = torch.zeros_like(theta)
        single = len(problem.parts) == 1
        with torch.enable_grad():
            for part in problem.parts:
                v = part(self.theta)
                (g,) = torch.autograd.grad(v, self.theta, create_graph=single)
                value, grad = value + v.detach(), grad + g.detach()
                if single:
                    self._graph = g
        self.value, self.grad = value, grad

    def _part_hvps(self, v: Tensor, create_graph: bool) -> list[Tensor]:
        if self._graph is not None:
            graphs = [self._graph]
        else:
            graphs = []
            for part in self.problem.parts:
                (g,) = torch.autograd.grad(part(self.theta), self.theta, create_graph=True)
                graphs.append(g)
        return [torch.autograd.grad(g, self.theta, v, retain_graph=True, create_graph=create_graph)[0] for g in graphs]

    def hvp(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(d,)`` or each row of a ``(k, d)`` block."""
        if v.dim() == 2:
            return torch.stack([self.hvp(row) for row in v]) if len(v) else v.clone()
        self.n_hvp += 1
        with torch.enable_grad():
            return _total(self._part_hvps(v.detach(), create_graph=False))

    def d3(self, v: Tensor, w: Tensor) -> Tensor:
        """``D3L[v, w] = grad_theta (v^T H w)``; rows of ``(k, d)`` blocks pair up."""
        if v.shape != w.shape:
            raise InputError(f"d3: v and w must have the same shape, got {tuple(v.shape)} and {tuple(w.shape)}.")
        if v.dim() == 2:
            return torch.stack([self.d3(a, b) for a, b in zip(v, w, strict=True)])
        with torch.enable_grad():
            out = torch.zeros_like(self.grad)
            for hw in self._part_hvps(w.detach(), create_graph=True):
                out = out + torch.autograd.grad(hw @ v.detach(), self.theta, retain_graph=True)[0]
        return out

    def hvp_graphs(self, U: Tensor) -> list[Tensor]:
        """``H u_b`` for each row of ``U`` (k, d), differentiable again: contract and backpropagate them."""
        with torch.enable_grad():
            return [_total(self._part_hvps(u.detach(), create_graph=True)) for u in U]

    def d3_pairs(self, U: Tensor, hu: list[Tensor] | None = None) -> Tensor:
        """``D[a, b] = D3L[u_a, u_b]`` for every pair of rows of ``U`` (k, d), shape ``(k, k, d)``.

        Each ``H u_b`` graph is built once (or passed in as ``hu``, from :meth:`hvp_graphs`) and
        shared by the pairs ``(a, b)``, ``a <= b``: k differentiable products instead of the
        k(k+1)/2 that :meth:`d3` on the pairs would build.
        """
        k = U.shape[0]
        out = U.new_zeros(k, k, U.shape[1])
        with torch.enable_grad():
            for b in range(k):
                h = self.hvp_graphs(U[b : b + 1])[0] if hu is None else hu[b]  # one graph alive at a time
                for a in range(b + 1):
                    val = torch.autograd.grad(h @ U[a].detach(), self.theta, retain_graph=True)[0]
                    out[a, b] = out[b, a] = val
        return out


def value_and_gradient(problem: Problem, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``(L(theta), g(theta))``, detached."""
    value = torch.zeros((), dtype=theta.dtype, device=theta.device)
    grad = torch.zeros_like(theta)
    for part in problem.parts:
        g, v = torch.func.grad_and_value(part)(theta)
        value, grad = value + v.detach(), grad + g.detach()
    return value, grad


def gradient(problem: Problem, theta: Tensor) -> Tensor:
    """``g(theta) = grad L(theta)``, detached."""
    return value_and_gradient(problem, theta)[1]


def hvp(problem: Problem, theta: Tensor, v: Tensor) -> Tensor:
    """``H(theta) v`` for a vector ``v`` of shape ``(d,)`` or a block ``(k, d)``, detached."""
    return Curvature(problem, theta).hvp(v)


def d3(problem: Problem, theta: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """``D3L[v, w] = grad_theta (v^T H(theta) w)``; rows of ``(k, d)`` blocks pair up.

    For a simple top eigenpair ``(S, u)``, ``grad S = D3L[u, u]``.
    """
    return Curvature(problem, theta).d3(v, w)


def dense_hessian(problem: Problem, theta: Tensor) -> Tensor:
    """The full ``d x d`` Hessian, by HVPs on the identity. For small problems and tests only."""
    eye = torch.eye(problem.dim, dtype=theta.dtype, device=theta.device)
    h = hvp(problem, theta, eye)
    return 0.5 * (h + h.T)


@dataclass
class EigenResult:
    """Top eigenpairs of ``H``: ``values`` (k,) descending, ``vectors`` (k, d) orthonormal rows.

    ``block`` holds all Ritz vectors of the solve (the ``k`` wanted plus the guard vectors);
    pass it as ``v0`` to warm-start the next solve.
    """

    values: Tensor
    vectors: Tensor
    block: Tensor
    n_hvp: int
    iterations: int
    converged: bool
    residuals: Tensor


def align_signs(vectors: Tensor, previous: Tensor | None) -> Tensor:
    """Flip each row of ``vectors`` so that it has a non-negative overlap with ``previous``."""
    if previous is None or previous.shape != vectors.shape:
        return vectors
    signs = torch.sign((vectors * previous).sum(dim=1))
    signs[signs == 0] = 1
    return vectors * signs[:, None]


def _orthonormalize(block: Tensor, against: Tensor | None = None, drop: float = 1e-10) -> Tensor:
    """Orthonormal rows spanning ``block`` minus its part in span(``against``), rank-revealing."""
    if against is not None and against.numel():
        for _ in range(2):  # twice is enough (Kahan)
            block = block - (block @ against.T) @ against
    if block.shape[0] == 0:
        return block
    norms = block.norm(dim=1, keepdim=True)
    block = block / norms.clamp_min(torch.finfo(block.dtype).tiny)
    q, r = torch.linalg.qr(block.T)
    keep = r.diagonal().abs() > drop
    q = q[:, keep].T
    if against is not None and against.numel():
        q = q - (q @ against.T) @ against
        q = q / q.norm(dim=1, keepdim=True)
    return q


def _ritz(S: Tensor, AS: Tensor, m: int) -> Tensor | None:
    """Coefficients of the top ``m`` Ritz vectors of the pencil (S AS^T, S S^T), or None if singular."""
    gram = S @ S.T
    L, info = torch.linalg.cholesky_ex(0.5 * (gram + gram.T))
    if int(info) != 0 or bool(L.diagonal().min() < 1e-8 * L.diagonal().max()):
        return None
    A = S @ AS.T
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    M = Linv @ (0.5 * (A + A.T)) @ Linv.T
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    top = torch.argsort(evals, descending=True)[:m]
    return Linv.T @ evecs[:, top]


def top_eigenpairs(
    problem: Problem | Curvature,
    theta: Tensor | None = None,
    k: int = 1,
    v0: Tensor | None = None,
    tol: float = 1e-4,
    max_iters: int = 200,
    guard: int = 0,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Largest *algebraic* eigenpairs of ``H(theta)`` by LOBPCG on Hessian-vector products.

    Block LOBPCG (Knyazev 2001) without preconditioner: Rayleigh-Ritz on
    ``span[X, R, P]`` (iterates, residuals, previous search directions). ``v0`` (``(k, d)`` or
    more rows, e.g. the previous call's vectors) warm-starts it; the block carries ``guard`` extra
    vectors, which speeds convergence when eigenvalues cluster (as at the edge of stability).
    Converged when every wanted pair has ``||H v - lam v|| <= tol * max(|lam_1|, 1e-12)``.
    The returned vectors' signs are aligned with ``v0``. Pass a :class:`Curvature` instead of
    ``(problem, theta)`` to share its gradient graph with the caller.
    """
    if isinstance(problem, Curvature):
        curv = problem
    elif theta is None:
        raise InputError("top_eigenpairs: pass theta with a Problem (or pass a Curvature, which has its theta).")
    else:
        curv = Curvature(problem, theta)
    theta = curv.theta.detach()
    d = curv.problem.dim
    if not isinstance(k, int) or not 1 <= k <= d:
        raise InputError(f"top_eigenpairs: k must be an int in [1, {d}] (the dimension), got {k!r}.")
    m = min(k + max(guard, 0), d)
    X = torch.randn(m, d, dtype=theta.dtype, device=theta.device, generator=generator)
    if v0 is not None:
        v0 = v0.reshape(-1, d).to(theta)
        X[: min(m, v0.shape[0])] = v0[:m]
    X = _orthonormalize(X)
    if X.shape[0] < m:  # degenerate start: refill with random directions
        extra = torch.randn(m - X.shape[0], d, dtype=theta.dtype, device=theta.device, generator=generator)
        X = torch.cat([X, _orthonormalize(extra, X)])
    AX = curv.hvp(X)
    n_hvp = m
    P = AP = None
    lam = torch.zeros(m, dtype=theta.dtype, device=theta.device)
    res = torch.full((k,), float("inf"), dtype=theta.dtype, device=theta.device)
    converged = False
    it = 0
    for it in range(max_iters + 1):
        # Rayleigh-Ritz on the current block.
        T = X @ AX.T
        evals, evecs = torch.linalg.eigh(0.5 * (T + T.T))
        order = torch.argsort(evals, descending=True)
        lam, C = evals[order], evecs[:, order]
        X, AX = C.T @ X, C.T @ AX
        R = AX - lam[:, None] * X
        res = R[:k].norm(dim=1)
        scale = max(float(lam[0].abs()), 1e-12)
        if bool((res <= tol * scale).all()):
            converged = True
            break
        if it == max_iters:
            break
        W = _orthonormalize(R, X)
        basis, Abasis = [X, W], [AX, curv.hvp(W)]
        n_hvp += W.shape[0]
        if P is not None:
            # P is kept unorthogonalised (so that A P stays exact); scale its rows only.
            scale_p = P.norm(dim=1, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)
            basis.append(P / scale_p)
            Abasis.append(AP / scale_p)
        S, AS = torch.cat(basis), torch.cat(Abasis)
        C = _ritz(S, AS, m)
        if C is None:  # P nearly dependent on [X, W]: restart without it
            S, AS = S[: X.shape[0] + W.shape[0]], AS[: X.shape[0] + W.shape[0]]
            C = _ritz(S, AS, m)
        if C is None:  # [X, W] degenerate too (e.g. non-finite products at a blown-up state): keep the block
            break
        # New search directions: the part of the update outside the old X.
        P, AP = C[m:].T @ S[m:], C[m:].T @ AS[m:]
        X, AX = C.T @ S, C.T @ AS
    vectors = align_signs(X[:k], None if v0 is None else v0[:k] if v0.shape[0] >= k else None)
    block = torch.cat([vectors, X[k:]])
    return EigenResult(lam[:k].clone(), vectors, block, n_hvp, it, converged, res)


class StateDerivatives:
    """``g``, ``H v`` and ``D3L`` on a batch of states, differentiable again when asked.

    Built once per right-hand-side evaluation from states ``thetas`` of shape ``(B, d)``. With
    ``create_graph=True`` every returned quantity is a differentiable function of ``thetas``
    (for the vector-Jacobian products of the adjoint method). Each Hessian-vector product costs
    one double-backward through the batched loss.
    """

    def __init__(self, problem: Problem, thetas: Tensor, create_graph: bool) -> None:
        self.problem = problem
        self.create_graph = create_graph
        if thetas.requires_grad and create_graph:
            self.thetas = thetas
        else:
            self.thetas = thetas.detach().requires_grad_(True)
        with torch.enable_grad():
            self.losses = problem.batched_loss(self.thetas)
            (self.g,) = torch.autograd.grad(self.losses.sum(), self.thetas, create_graph=True)

    def hvp(self, v: Tensor) -> Tensor:
        """``H(theta_b) v_b`` for each state ``b``; ``v`` is ``(B, d)``."""
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(self.g, self.thetas, grad_outputs=v, create_graph=True)
        return hv

    def grad_of(self, scalars: Tensor) -> Tensor:
        """Gradient of a per-state scalar ``(B,)`` built from these derivatives."""
        with torch.enable_grad():
            (out,) = torch.autograd.grad(scalars.sum(), self.thetas, create_graph=True)
        return out

    def out(self, x: Tensor) -> Tensor:
        """Return ``x`` with or without its graph, as this evaluation was asked."""
        return x if self.create_graph else x.detach()
