"""The central flow of GD: the time-averaged trajectory at the edge of stability.

Cohen, Damian, Talwalkar, Kolter, Lee, *Understanding Optimization in Deep Learning with Central
Flows*, ICLR 2025. In step time, with ``Sigma`` the covariance of GD's oscillation,

    dtheta/dt = -lr [g + 1/2 grad_theta <H(theta), Sigma>],

``Sigma = U X U^T`` over the *critical* eigenvectors ``U`` (rows ``u_1..u_k``, eigenvalues
``>= critical / lr``, 1.95/lr as in the paper's code) and ``X`` (k x k, PSD) the solution of a small
semidefinite complementarity problem that keeps every critical eigenvalue at ``2/lr``.

Derivation of the complementarity problem. Hold ``U`` fixed and let ``M = U H U^T`` (k x k;
diagonal ``diag(lambda)`` for exact eigenvectors) and ``D_kl = grad_theta (u_k^T H u_l) = D3L[u_k, u_l]``.
Along the flow ``dM_kl/dt = <D_kl, dtheta/dt> = -lr <D_kl, g> - lr/2 sum_mn X_mn <D_kl, D_mn>``
(for a simple eigenvalue this is ``d lambda/dt = <grad S, dtheta/dt>``). GD's oscillation must keep
``M <= 2/lr`` (as a matrix): linearised over a relaxation time ``tau`` (steps), the condition is
``C = (2/lr - M) - tau dM/dt >= 0``, with ``X >= 0`` and ``<X, C> = 0`` (oscillation only where the
constraint is active). Multiplying ``C`` by ``2 / (lr tau)``:

    0 <= X  perp  A + B[X] >= 0,    A = 2 (2/lr - M) / (lr tau) + 2 [<D_kl, g>]_kl,
                                    B[X]_kl = sum_mn <D_kl, D_mn> X_mn.

``B`` is the Gram operator of the ``D_kl`` (PSD), so this is the optimality condition of the convex
problem ``min_{X >= 0} <A, X> + 1/2 <X, B[X]>``, solved here by accelerated projected gradient on
the PSD cone (FISTA with restarts), warm-started from the previous solution. On the active set
(``lambda = 2/lr``) the margin vanishes and ``d lambda_k/dt = 0``; eigenvalues in the critical band
below ``2/lr`` may rise at most at rate ``(2/lr - lambda)/tau`` (they reach ``2/lr`` with time
constant ``tau`` instead of overshooting). For one critical eigenvalue at ``2/lr`` this is the
closed form ``sigma^2 = max(0, -2 <g, grad S> / ||grad S||^2)``.

Predicted time averages: ``E[L] ~ L + 1/2 <H, Sigma> = L + 1/2 tr(X M)`` (:meth:`CentralFlow.predicted_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..autodiff import Curvature, StateDerivatives, top_eigenpairs
from ..errors import InputError, NeuralflowError
from ..problems import Problem, check_positive_int
from .approximations import (
    CONTINUOUS_TIME_1,
    CRITICAL_SUBSPACE,
    QUASI_STATIC_OSCILLATION,
    SECOND_ORDER_OSCILLATION,
    SINGLE_CRITICAL,
)
from .base import Flow

__all__ = [
    "CentralFlow",
    "CriticalState",
    "solve_sdcp",
    "QUASI_STATIC_OSCILLATION",
    "CRITICAL_SUBSPACE",
    "SECOND_ORDER_OSCILLATION",
    "SINGLE_CRITICAL",
    "covariance_drift",
    "project_psd",
]


def project_psd(X: Tensor) -> Tensor:
    """The nearest positive semi-definite matrix to the symmetric part of ``X`` (Frobenius norm)."""
    lam, V = torch.linalg.eigh(0.5 * (X + X.T))
    return (V * lam.clamp_min(0)) @ V.T


def solve_sdcp(
    A: Tensor, B: Tensor, X0: Tensor | None = None, tol: float = 1e-10, max_iters: int = 5000
) -> tuple[Tensor, float]:
    """Solve ``0 <= X perp A + B[X] >= 0`` (PSD cone, k x k) for a PSD operator ``B``.

    ``A`` is ``(k, k)`` symmetric and ``B`` the ``(k*k, k*k)`` matrix of ``X -> B[X]`` on row-major
    ``vec(X)``. Equivalent to ``min_{X >= 0} <A, X> + 1/2 <X, B[X]>``; solved by FISTA with
    gradient-based restarts (O'Donoghue & Candes 2015) on the PSD cone, started at ``X0``. Returns
    ``(X, residual)`` with ``residual = ||X - P(X - (A + B[X]) / ||B||)||`` relative to ``||A|| / ||B||``
    (zero exactly at a solution). One critical direction (``k = 1``) uses the closed form
    ``x = max(0, -A / B)``.
    """
    k = A.shape[0]
    if k == 0:
        return A.clone(), 0.0
    if k == 1:
        b = B.reshape(()).clamp_min(torch.finfo(B.dtype).tiny)
        return (-A / b).clamp_min(0).reshape(1, 1), 0.0
    norm = float(torch.linalg.eigvalsh(0.5 * (B + B.T))[-1])
    if not norm > 0:  # the oscillation cannot move the curvature: X = 0 is the solution iff A >= 0
        if float(torch.linalg.eigvalsh(A)[0]) < 0:
            raise NeuralflowError(
                "solve_sdcp: B vanishes and A is not PSD; the critical eigenvalues cannot be held at 2/lr "
                "(no third derivatives, e.g. a quadratic loss above the edge of stability)."
            )
        return torch.zeros_like(A), 0.0
    step = 1.0 / norm
    scale = max(float(A.norm()) * step, torch.finfo(A.dtype).tiny)

    def grad(Z: Tensor) -> Tensor:
        return A + (B @ Z.reshape(-1)).reshape(k, k)

    X = torch.zeros_like(A) if X0 is None or X0.shape != A.shape else project_psd(X0)
    Y, momentum = X, 1.0
    residual = float("inf")
    for _ in range(max_iters):
        X_new = project_psd(Y - step * grad(Y))
        residual = float((X_new - project_psd(X_new - step * grad(X_new))).norm()) / scale
        if residual <= tol:
            return X_new, residual
        if float(((Y - X_new) * (X_new - X)).sum()) > 0:  # restart when the momentum points uphill
            momentum = 1.0
        m_new = 0.5 * (1 + (1 + 4 * momentum**2) ** 0.5)
        Y = X_new + ((momentum - 1) / m_new) * (X_new - X)
        X, momentum = X_new, m_new
    return X, residual


def covariance_drift(curv: Curvature, U: Tensor, X: Tensor, hu: list[Tensor] | None = None) -> Tensor:
    """The oscillation's pull ``grad_theta <H(theta), Sigma> = sum_kl X_kl D3L[u_k, u_l]``, ``Sigma = U^T X U``.

    ``U`` (k, d) and ``X`` (k, k) are held fixed; one backward pass through the ``H u_b`` graphs (``hu``,
    from ``curv.hvp_graphs(U)``; built here if not given, one at a time for a problem of several parts so that
    memory stays that of one graph).
    Shared by every flow whose drift is ``-lr [g + 1/2 grad <H, Sigma>]``.
    """
    k = U.shape[0]
    if k == 0:
        return torch.zeros_like(curv.grad)
    XU = (X @ U).detach()
    if hu is None and len(curv.problem.parts) == 1:
        hu = curv.hvp_graphs(U)
    with torch.enable_grad():
        if hu is not None:
            parts = [(XU[b] * hu[b]).sum() for b in range(k)]
            return torch.autograd.grad(sum(parts[1:], parts[0]), curv.theta)[0]
        grads = [torch.autograd.grad((XU[b] * curv.hvp_graphs(U[b : b + 1])[0]).sum(), curv.theta)[0] for b in range(k)]
        return sum(grads[1:], grads[0])


@dataclass
class CriticalState:
    """What the central flow solved at one state (all detached).

    ``values`` the tracked top eigenvalues, ``vectors`` (k, d) the critical eigenvectors ``U``,
    ``M = U H U^T`` (k x k), ``X`` the oscillation covariance in that basis (``Sigma = U^T X U``),
    ``drift`` (d,) the oscillation's pull ``grad <H, Sigma> = sum_kl X_kl D3L[u_k, u_l]``, ``D``
    (k, k, d) the ``D3L[u_k, u_l]`` where this evaluation refreshed them (None where it reused the
    Gram matrix of an earlier one), ``loss`` and ``grad`` at the state, ``residual`` of the
    complementarity solve.
    """

    values: Tensor
    vectors: Tensor
    M: Tensor
    X: Tensor
    drift: Tensor
    D: Tensor | None
    loss: Tensor
    grad: Tensor
    residual: float

    @property
    def n_critical(self) -> int:
        return self.vectors.shape[0]

    @property
    def sigma2(self) -> Tensor:
        """Variances of the oscillation along its principal axes (eigenvalues of ``X``, descending)."""
        return torch.linalg.eigvalsh(self.X).flip(0) if self.n_critical else self.X.new_zeros(0)

    @property
    def predicted_loss(self) -> Tensor:
        """Time-averaged loss ``L + 1/2 <H, Sigma> = L + 1/2 tr(X M)``."""
        return self.loss + 0.5 * (self.X * self.M).sum()

    def velocity(self, lr: float) -> Tensor:
        """``-lr [g + 1/2 sum_kl X_kl D3L[u_k, u_l]]``."""
        return -lr * (self.grad + 0.5 * self.drift)


@dataclass
class WarmStart:
    """What one batch index carries from one evaluation to the next.

    ``block``/``n_track`` warm-start the eigen-solve and ``X`` the complementarity solve. ``gram``
    is the Gram matrix of the ``D3L[u_k, u_l]`` in the basis ``U`` of the state ``theta_gram``,
    ``move`` how far the evaluation before it was, ``age`` the evaluations that have reused it.
    """

    block: Tensor | None = None
    n_track: int = 2
    X: Tensor | None = None
    gram: Tensor | None = None
    U: Tensor | None = None
    theta_gram: Tensor | None = None
    move: float = 0.0
    age: int = 0
    theta: Tensor | None = None

    def reusable_gram(self, theta: Tensor, U: Tensor, gram_every: int) -> Tensor | None:
        """The cached Gram matrix carried into the basis ``U`` at ``theta``, or None when it must be recomputed.

        Reused while fewer than ``gram_every`` evaluations have used it, the state stays within
        ``gram_every`` times the move that preceded its computation (a new window or a far batch point
        recomputes it), and
        the critical subspace is the same (``R = U U_old^T`` orthogonal to 1e-2). Within a cluster at
        ``2/lr`` the eigenvectors reorder and rotate freely; ``B`` follows them as
        ``(R x R) B (R x R)^T``, since ``D_kl`` is bilinear in ``(u_k, u_l)``.
        """
        k = U.shape[0]
        if (
            k == 0
            or self.gram is None
            or self.U is None
            or self.theta_gram is None
            or self.U.shape[0] != k
            or self.age + 1 >= gram_every
        ):
            return None
        if not self.move > 0 or float((theta - self.theta_gram).norm()) > gram_every * self.move:
            return None
        R = U @ self.U.T
        if float((R @ R.T - torch.eye(k, dtype=R.dtype, device=R.device)).abs().max()) > 1e-2:
            return None
        RR = torch.kron(R, R)
        return RR @ self.gram @ RR.T


class CentralFlow(Flow):
    """GD's central flow, ``dtheta/dt = -lr [g + 1/2 grad <H, Sigma>]``, several critical eigenvalues.

    See the module docstring for the derivation of ``Sigma``.

    Cost: the complementarity problem needs ``A`` (through ``<D_kl, g> = u_k . D3L[g, u_l]``: k double
    backward passes) and the Gram matrix ``B`` of the ``D_kl`` (k(k+1)/2 passes, the bulk at several
    critical eigenvalues). ``A`` is exact at every evaluation; ``B`` is recomputed every
    ``gram_every`` evaluations of a batch index and reused in between, carried into the current
    eigenvector basis, as long as the critical subspace and the state have not jumped (see
    ``WarmStart.reusable_gram``; ``gram_every=1``: always exact). ``B`` sets the gain of the feedback
    that holds each critical eigenvalue at ``2/lr``; a ``B`` one substep old changes the margin at
    which the oscillation balances the drive by ``O(step)``, which the margin term keeps bounded.

    Eigenvectors come from ``autodiff.top_eigenpairs`` warm-started from the previous evaluation's
    block (one block per batch index), signs aligned; the number tracked grows to stay one above the
    number of critical eigenvalues. Every evaluation stores its :class:`CriticalState` in
    ``self.last`` (``.sigma2``, ``.X``, ``.n_critical``, ``.predicted_loss`` for logging) and the most
    critical eigenvalues seen at once in ``self.n_critical_max``; call
    :meth:`reset` before a new trajectory (``simulate`` does). The first evaluation after a reset
    refuses a state whose sharpness exceeds ``2/lr``: the central flow is undefined there. With
    ``above_edge="hold"`` it accepts it and holds every critical eigenvalue above ``2/lr`` where it
    is: the margin ``2/lr - lambda`` of the complementarity problem is clipped at 0, so ``Sigma``
    keeps ``d lambda / dt <= 0`` there instead of pulling ``lambda`` down to ``2/lr`` within
    ``relaxation`` steps (which, from a state well above the edge, is a large jump). That is an
    extension, not the paper's flow. It lets the central flow serve as the physics of a fit to
    smoothed GD, whose states hover a little above ``2/lr`` at the edge of stability (the README's fit at the
    edge of stability, ``benchmarks/eos_fit.py``); the excess is charged to the quasi-static-oscillation
    approximation.

    Derivatives for the adjoint: ``U`` and ``X`` are computed outside the autograd graph. When
    ``theta`` requires grad, ``forward`` returns ``-lr [g + 1/2 grad_theta sum_kl X_kl u_k^T H u_l]``
    built with double backward, so its Jacobian is ``-lr [H + 1/2 D4L[Sigma]]`` with ``U`` and ``X``
    frozen: it includes the change of ``g`` and of the third derivatives along the frozen ``Sigma``,
    and neglects ``dU/dtheta`` (eigenvector rotation) and ``dX/dtheta`` (the change of the
    complementarity solution). Without grad, the same field comes from one :class:`Curvature`.

    Discretisation (``simulate`` default): explicit Euler with step 1/2 (2 substeps per GD step); the
    paper's reference uses 1/4, which gives the same trajectory well within its distance to smoothed GD at
    twice the cost (the README's central-flow section, ``benchmarks/bench_flows.py``). The flow is a projected
    (constrained) flow whose right-hand side has kinks
    where eigenvalues enter or leave the critical set, which breaks the error estimates of adaptive
    solvers; Euler with ``tau >= step`` is stable along the critical directions (factor ``1 - step/tau``
    on the margin) and along ``u`` (``|1 - step lr lambda| = 0`` at ``lambda = 2/lr``).

    Parameters
    ----------
    problem : Problem
        The loss GD runs on.
    lr : float
        GD's step size; time is in steps (iterate ``k`` at ``t = k``).
    critical : float, default 1.95
        Eigenvalues ``>= critical / lr`` are critical (1.95 as in the paper's code).
    relaxation : float, default 1.0
        ``tau`` in steps: the time constant with which a critical eigenvalue below ``2/lr`` is drawn to it; keep
        it at least the solver's step.
    max_critical : int, default 8
        At most this many critical eigenvalues; 1 gives the single-eigenvalue flow and adds the
        ``single-critical-eigenvalue`` approximation.
    eig_tol : float, default 1e-3
        LOBPCG's relative residual; the eigenvectors only enter through ``Sigma``, which is invariant to
        rotations within a cluster, so 1e-3 is enough.
    sdcp_tol : float, default 1e-9
        Relative residual of the complementarity solve (:func:`solve_sdcp`).
    gram_every : int, default 3
        Recompute the Gram matrix ``B`` every this many evaluations of a batch index (1: always exact).
    above_edge : str, default "error"
        ``"error"``: refuse a first state whose sharpness exceeds ``2/lr``; ``"hold"``: accept it and hold the
        eigenvalues above ``2/lr`` where they are (see above).

    Raises
    ------
    InputError
        When the loss has no third derivatives (a ReLU net) or a setting is out of range; and, at the first
        evaluation after :meth:`reset`, from a state above ``2/lr`` with ``above_edge="error"``.
    """

    name = "central"
    latex = r"-\eta\left(g+\frac{1}{2}\sigma^{2}\nabla S\right)"
    solver = {"method": "euler", "options": {"step_size": 0.5}}

    def __init__(
        self,
        problem: Problem,
        lr: float,
        critical: float = 1.95,
        relaxation: float = 1.0,
        max_critical: int = 8,
        eig_tol: float = 1e-3,
        sdcp_tol: float = 1e-9,
        gram_every: int = 3,
        above_edge: str = "error",
    ) -> None:
        super().__init__(problem, lr)
        if not problem.thrice_differentiable:
            raise InputError(
                f"CentralFlow needs third derivatives of the loss (grad S = D3L[u, u]), but problem "
                f"{problem.name!r} is not smooth enough (e.g. a ReLU net); use a smooth activation (tanh, gelu)."
            )
        if not 0 < critical <= 2:
            raise InputError(f"CentralFlow: critical must be in (0, 2] (times 1/lr), got {critical!r}.")
        if isinstance(relaxation, bool) or not (isinstance(relaxation, (int, float)) and 0 < relaxation < math.inf):
            # 0 would divide by zero, inf would switch the oscillation's restoring force off without a word
            raise InputError(f"CentralFlow: relaxation must be a positive finite time in steps, got {relaxation!r}.")
        check_positive_int(max_critical, "CentralFlow: max_critical")
        check_positive_int(gram_every, "CentralFlow: gram_every")
        if above_edge not in ("error", "hold"):
            raise InputError(f"CentralFlow: above_edge must be 'error' or 'hold', got {above_edge!r}.")
        self.above_edge = above_edge
        self.gram_every = gram_every
        self.critical = float(critical)
        self.relaxation = float(relaxation)
        self.max_critical = min(max_critical, problem.dim)
        self.eig_tol = eig_tol
        self.sdcp_tol = sdcp_tol
        self.approximations = (CONTINUOUS_TIME_1, QUASI_STATIC_OSCILLATION, CRITICAL_SUBSPACE, SECOND_ORDER_OSCILLATION)
        if self.max_critical == 1:
            self.approximations += (SINGLE_CRITICAL,)
        self.last: CriticalState | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the warm starts (eigenvector blocks, ``X``, ``B``) before integrating a new trajectory."""
        self._cache: dict[int, WarmStart] = {}  # per batch index
        self.n_critical_max = 0

    @property
    def threshold(self) -> float:
        """``2 / lr``."""
        return 2.0 / self.lr

    def solve(self, theta: Tensor, index: int = 0) -> CriticalState:
        """Eigenpairs, ``D3L`` contractions and the oscillation covariance ``X`` at one state."""
        theta = self.problem.check_theta(theta, "state").detach()
        fresh = index not in self._cache
        warm = self._cache.setdefault(index, WarmStart(n_track=min(2, self.problem.dim)))
        block, n_track = warm.block, warm.n_track
        curv = Curvature(self.problem, theta)
        limit = min(self.max_critical + 1, self.problem.dim)
        while True:  # track at least one non-critical eigenvalue, so that none is missed
            eig = top_eigenpairs(curv, k=n_track, v0=block, tol=self.eig_tol)
            crit = int((eig.values >= self.critical / self.lr).sum().clamp(max=self.max_critical))
            if crit < n_track or n_track >= limit:
                break
            n_track, block = min(n_track + 2, limit), eig.block
        above = float(eig.values[0]) > self.threshold * (1 + 1e-4)  # at the edge (its own states) is fine
        if fresh and above and self.above_edge == "error":
            del self._cache[index]
            raise InputError(
                f"CentralFlow: the sharpness at the starting point is {float(eig.values[0]):.6g} > 2/lr = "
                f"{self.threshold:.6g}; the central flow is undefined above the edge of stability. Start it "
                "from an earlier iterate (before the EoS onset), lower lr, or pass above_edge='hold' to hold the "
                "critical eigenvalues where they are."
            )
        U = eig.vectors[:crit]
        M = torch.diag(eig.values[:crit])
        # one part: keep the k differentiable H u_b and share them; several parts (mini-batched data):
        # build them one at a time, so that memory stays that of one graph
        hu = curv.hvp_graphs(U) if len(self.problem.parts) == 1 else None

        def graph(b: int) -> Tensor:
            return hu[b] if hu is not None else curv.hvp_graphs(U[b : b + 1])[0]

        D = None
        gram = warm.reusable_gram(theta, U, self.gram_every)
        if gram is None:
            D = curv.d3_pairs(U, hu)
            flat = D.reshape(crit * crit, theta.numel())
            gram, Dg = flat @ flat.T, D @ curv.grad
            move = 0.0 if warm.theta is None else float((theta - warm.theta).norm())
            warm.gram, warm.U, warm.theta_gram, warm.move, warm.age = gram, U, theta, move, 0
        else:
            warm.age += 1
            with torch.enable_grad():  # <D_kl, g> = u_k . D3L[g, u_l]: k passes instead of k(k+1)/2
                W = torch.stack(
                    [torch.autograd.grad(graph(b) @ curv.grad, curv.theta, retain_graph=True)[0] for b in range(crit)]
                )
            Dg = U @ W.T
            Dg = 0.5 * (Dg + Dg.T)
        margin = self.threshold * torch.eye(crit, dtype=M.dtype, device=M.device) - M
        if self.above_edge == "hold":
            margin = margin.clamp_min(0)  # diagonal: an eigenvalue above 2/lr is held, not pulled down
        A = 2 * margin / (self.lr * self.relaxation) + 2 * Dg
        X, residual = solve_sdcp(A, gram, warm.X, tol=self.sdcp_tol)
        if D is not None:
            drift = torch.einsum("kl,kld->d", X, D)
        else:
            drift = covariance_drift(curv, U, X, hu)
        warm.block, warm.n_track, warm.X, warm.theta = eig.block, n_track, X, theta
        self.n_critical_max = max(self.n_critical_max, crit)
        self.last = CriticalState(eig.values, U, M, X, drift.detach(), D, curv.value, curv.grad, residual)
        return self.last

    def forward(self, t: Tensor, theta: Tensor) -> Tensor:
        self.problem.check_theta(theta, "state")
        batch = theta if theta.dim() == 2 else theta.unsqueeze(0)
        if torch.is_grad_enabled() and batch.requires_grad:
            out = self.vector_field(t, StateDerivatives(self.problem, batch, create_graph=True))
        else:
            out = torch.stack([self.solve(th, b).velocity(self.lr) for b, th in enumerate(batch.detach())])
        return out if theta.dim() == 2 else out[0]

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        solved = [self.solve(th, b) for b, th in enumerate(state.thetas.detach())]
        k = max(s.n_critical for s in solved)
        if k == 0:
            return state.out(-self.lr * state.g)
        B, d = state.thetas.shape
        U = state.thetas.new_zeros(B, k, d)
        XU = state.thetas.new_zeros(B, k, d)
        for b, s in enumerate(solved):
            U[b, : s.n_critical] = s.vectors
            XU[b, : s.n_critical] = s.X @ s.vectors
        with torch.enable_grad():
            parts = [(XU[:, i] * state.hvp(U[:, i])).sum(dim=1) for i in range(k)]
            contraction = sum(parts[1:], parts[0])  # <H, Sigma> per state
            return state.out(-self.lr * (state.g + 0.5 * state.grad_of(contraction)))

    def predicted_loss(self, theta: Tensor) -> Tensor:
        """The central flow's prediction of GD's time-averaged loss, ``L + 1/2 <H, Sigma>``, at ``theta``."""
        return self.solve(theta).predicted_loss

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "critical": self.critical,
            "relaxation": self.relaxation,
            "max_critical": self.max_critical,
            "eig_tol": self.eig_tol,
            "sdcp_tol": self.sdcp_tol,
            "gram_every": self.gram_every,
            "above_edge": self.above_edge,
        }
