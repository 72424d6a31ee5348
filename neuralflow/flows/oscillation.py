"""The oscillation flow: the edge-of-stability flow that carries GD's oscillation covariance as a state.

science.md section 7. Write GD's iterates as ``theta_k = m_k + (-1)^k x_k`` (``m`` the time-averaged
iterate, ``x`` the period-two component) and ``Sigma = E[x x^T] = U^T X U`` over the tracked top-k
Hessian eigenvectors ``U`` (rows). Along an eigenvector ``u_i`` the linearised GD map multiplies the
component by ``1 - lr lambda_i`` per step, so its variance by ``(1 - lr lambda_i)^2``; averaging the
gradient over ``m +- x`` gives the central flow's drift (Cohen, Damian, Talwalkar, Kolter, Lee, ICLR 2025).
In step time:

    dm/dt = -lr [g(m) + 1/2 grad_m <H(m), Sigma>],
    dX/dt = R X + X R + q I,        R = diag(r_i),  r_i = log|1 - lr lambda_i|,

with ``q`` the variance injected per step along every direction (``nu^2`` for Gaussian noise of standard
deviation ``nu`` per coordinate, plus the float round-off floor, :func:`neuralflow.oscillation.roundoff_variance`).
With ``order=1`` (registry name ``"oscillation1"``) ``dm/dt`` also carries GD's first-order backward-error term off
the tracked directions, ``-(lr^2/2) P H g`` with ``P = I - U^T U`` (science.md section 2): there ``lr lambda`` is
small and the modified equation holds; along ``U``, ``lr lambda ~ 2``, its series does not converge and the Floquet
rate is already GD's per-step factor.
Past ``2/lr`` (``r > 0``) the oscillation grows from that floor, which makes the *quiet stretch* of GD
past the edge; once large it bends the sharpness below ``2/lr`` through the drift (the *catapult*), then
decays. Damian, Nichani, Lee (ICLR 2023, section 4) is its one-direction reduction: near the edge
``2 r ~ 2 lr (lambda - 2/lr)``, their ``x_{k+1} = -(1 + lr y_k) x_k``. The central flow is its quasi-static
limit: with ``R`` multiplied by a stiffness factor going to infinity, ``X`` sits where the critical
eigenvalues stop moving (tested).

**The basis of X.** ``X`` is stored in the basis of a reference block ``U_ref`` that the flow keeps per
trajectory (batch index). An evaluation at ``m`` computes the current top-k eigenvectors ``U`` (warm-started
LOBPCG, signs aligned), carries ``X`` into them with ``C = U U_ref^T`` (``X_U = C X C^T``; ``C`` is orthogonal
while the tracked subspace is the same, whatever rotations and swaps happen inside it, as the central flow
carries its Gram matrix), evaluates both equations there and carries ``dX/dt`` back (``C^T dX_U C``), so any
torchdiffeq solver integrates a state in one fixed basis. Between output times :meth:`rebase` moves the
reference to the last evaluation's eigenvectors. A direction that *leaves* the tracked set (an eigenvalue
overtaken by the (k+1)-th) takes its variance with it: the flow models it as back at its floor. A direction
that *enters* starts from its equilibrium ``q / (2 |r_i|)`` (its share ``1 - ||c_i||^2`` outside the old
span; the part inside is carried), which is where the injected-variance approximation puts a direction
below the edge; keep ``n_track`` above the number of eigenvalues that reach ``2/lr`` together.

**The ODE state and its discretisation.** Explicit Euler with a unit step *is* GD and is unstable above
``2/lr``; the default solver is explicit Euler with step 1/2 (any torchdiffeq solver works). The variance
equation is stiff and its growth is the whole point (the quiet stretch is ``log(s_final / s_floor) / 2r``
steps), so it is integrated in Lawson's integrating-factor form: the extra state is ``(Z, rho)`` with
``X = E Z E``, ``E = diag(exp(rho))`` in the reference basis, ``drho/dt = diag(R_ref)`` and
``dZ/dt = E^{-1} (N X + X N + q C^T C) E^{-1}`` (``R_ref = C^T R C``, ``N`` its off-diagonal part, non-zero
only while eigenvectors rotate inside a cluster). Every solver then integrates the growth
``exp(2 int r dt)`` exactly for a piecewise-constant rate, and a diagonal congruence keeps ``X`` positive
semi-definite; :meth:`rebase` folds ``E`` back into ``Z`` (``rho = 0`` at every output time) and projects
``X`` onto the PSD cone (the off-diagonal ``N`` terms are explicit). Plain Euler on ``X`` would make the
growth ``(1 + r/2)^2`` per step instead of ``exp(r)``, a relative error of ``r/2`` (5-10 percent on the
quiet stretch), and breaks positivity where a direction decays fast. ``r_i`` is clamped at
``-max_decay``: at ``lambda = 1/lr`` GD kills its component in one step and ``log 0`` is not a rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..autodiff import Curvature, StateDerivatives, top_eigenpairs
from ..errors import InputError
from ..oscillation import roundoff_variance
from ..problems import Problem, check_positive_int
from ..trajectory import Trajectory
from .approximations import (
    ADIABATIC_EIGENVECTORS,
    CONTINUOUS_TIME_COUPLING,
    CONTINUOUS_TIME_OFF_TRACKED,
    ISOTROPIC_INJECTION,
    LINEAR_FLOQUET_GROWTH,
    MODIFIED_OFF_TRACKED,
    SECOND_ORDER_OSCILLATION,
    TRACKED_SUBSPACE,
)
from .base import ExtraState, Flow
from .central import project_psd

__all__ = [
    "OscillationFlow",
    "carry_covariance",
    "OscillationState",
    "LINEAR_FLOQUET_GROWTH",
    "TRACKED_SUBSPACE",
    "ADIABATIC_EIGENVECTORS",
    "ISOTROPIC_INJECTION",
]


OSCILLATION_COVARIANCE = ExtraState(
    name="oscillation-covariance",
    symbol="X",
    shape=(0, 0),  # set per flow: (n_track + 1, n_track)
    statement="The covariance of GD's period-two oscillation in the basis of the tracked top-k Hessian "
    "eigenvectors, Sigma = U^T X U, in integrating-factor form: k rows of Z and one row of rho, "
    "X = diag(exp(rho)) Z diag(exp(rho)) (OscillationFlow.covariance).",
)


def carry_covariance(X: Tensor, U_old: Tensor, U_new: Tensor, floor: Tensor) -> Tensor:
    """``X`` (in the basis of the rows of ``U_old``) re-expressed in the basis ``U_new``, both (k, d) (or batches).

    ``X_new = C X C^T + diag((1 - ||c_i||^2) floor_i)`` with ``C = U_new U_old^T``. Within the same tracked
    subspace ``C`` is orthogonal (eigenvectors rotated or swapped inside a cluster) and ``Sigma = U^T X U``
    is unchanged. A direction of ``U_new`` partly outside the old span gets the carried part plus its
    ``floor`` (the equilibrium variance) for the share outside; the variance of a direction that left the
    span is dropped.
    """
    C = U_new @ U_old.mT
    carried = C @ X @ C.mT
    outside = (1 - C.pow(2).sum(dim=-1)).clamp_min(0)
    return 0.5 * (carried + carried.mT) + torch.diag_embed(outside * floor)


def _check_order(order: object) -> int:
    """``order`` of :class:`OscillationFlow`: 0 (continuous time) or 1 (GD's backward-error term off ``U``)."""
    if isinstance(order, bool) or order not in (0, 1):
        raise InputError(
            f"OscillationFlow: order must be 0 (continuous time) or 1 (with -(lr^2/2) P H g), got {order!r}."
        )
    return int(order)


@dataclass
class OscillationState:
    """What one evaluation of the oscillation flow saw (detached): ``values`` (k,) the tracked eigenvalues,
    ``vectors`` (k, d), ``X`` (k, k) in that basis, ``rates`` (k,) the ``r_i`` used, ``loss`` at the state."""

    values: Tensor
    vectors: Tensor
    X: Tensor
    rates: Tensor
    loss: Tensor

    @property
    def variance(self) -> Tensor:
        """Total predicted oscillation variance along the tracked eigenvectors, ``tr X``."""
        return self.X.diagonal().sum()

    @property
    def predicted_loss(self) -> Tensor:
        """Time-averaged loss ``L + 1/2 <H, Sigma> = L + 1/2 sum_i lambda_i X_ii``."""
        return self.loss + 0.5 * (self.values * self.X.diagonal()).sum()


@dataclass
class _Track:
    """Per batch index: the eigen-solver's warm block, the basis ``U_ref`` of the state's ``X`` and the last ``U``;
    ``t0`` the time of the first evaluation and ``block0`` the eigenvectors found there."""

    block: Tensor | None = None
    t0: float | None = None
    block0: Tensor | None = None
    U_ref: Tensor | None = None
    U_last: Tensor | None = None
    rates_last: Tensor | None = None


class OscillationFlow(Flow):
    """``dm/dt = -lr [g + 1/2 grad <H, Sigma>] (- (lr^2/2) P H g)``, ``dX/dt = R X + X R + q I``: the oscillation as
    a state (the bracketed term with ``order=1``).

    See the module docstring for the equations, the basis of ``X`` and the discretisation. Parameters:
    ``q`` the variance injected per step per direction (default: the float round-off floor at the problem's
    ``theta0``; :meth:`from_trajectory` adds the trajectory's noise ``nu^2``), ``n_track`` the number ``k`` of
    tracked top eigenvectors (``X`` is k x k), ``stiffness`` a factor on ``R`` (1 is the physics; large values
    approach the central flow), ``max_decay`` the clamp on ``-r``, ``eig_tol`` the LOBPCG relative residual,
    ``order`` the backward-error order of ``dm/dt`` off the tracked directions: 0 the continuous-time drift above,
    1 adds GD's first-order term ``-(lr^2/2) P H g`` with ``P = I - U U^T`` (science notes section 2; along the
    tracked directions ``lr lambda ~ 2``, where the series does not converge and the oscillation terms act),
    ``lag`` the couplings' discrete-time lag in steps (below).

    **The lag.** GD's map multiplies the oscillation by ``1 - lr lambda_k`` at the curvature of step ``k`` for the
    whole step, and its drift uses the oscillation of step ``k``: both couplings run half a step behind the
    continuous flow. ``lag = tau`` in ``(0, 1/2]`` (at ``stiffness`` 1) puts that in the equations to first order:
    the drift sees ``X - tau dX/dt`` and the growth the rates ``r - tau dr/dt`` (``dr_i/dt = lr / (lr lambda_i - 1)
    D3L[u_i, u_i, dm/dt]``, 0 where the rate is clamped; one more gradient graph and ``k`` Hessian-vector products
    per evaluation). ``self.last`` keeps the state's own ``X`` and rates. On Damian et al.'s two-variable cycle
    this recovers GD's catapult, whose peak the exact flow reaches to 0.71 (tested). Explicit Euler in steps of
    ``h`` already lags ``h/2`` (its rates and its drift are those of the substep's start), so with the default
    solver the theory's lag is ``1/4`` (:func:`~neuralflow.corrections.lag_theory`). A
    :class:`~neuralflow.corrections.HiddenStateLibrary` with the term ``lag`` fits it (its unit field is the
    derivative of this right-hand side in ``tau``, so the fitted coefficient is this lag to first order).

    The ODE state is ``[m, Z.flatten(), rho]`` (:attr:`extra_state`, shape ``(k + 1, k)``; :meth:`covariance`
    gives ``X``, :meth:`extra_from_covariance` the reverse); :func:`~neuralflow.flows.simulate` starts it from
    :meth:`initial_extra` and calls :meth:`rebase` at every output time (where ``rho = 0`` and ``X = Z``).
    Each evaluation stores an :class:`OscillationState` in ``self.last``. Cost per evaluation (a batch of states
    at once): one gradient graph, k Hessian-vector products that refine the warm eigenvectors by Rayleigh-Ritz
    (a warm LOBPCG only where they fail the residual test) and one backward pass for the drift; no
    complementarity solve and no Gram matrix of ``D3L`` pairs; ``order=1`` (or a fitted ``PHg``) adds one
    Hessian-vector product; a lag (the physics' or a fitted one) one more gradient graph and ``k`` Hessian-vector
    products, and a fitted lag one more backward pass (two graphs and ``2k`` products on lagged physics). A hybrid
    with a :class:`~neuralflow.corrections.HiddenStateLibrary` evaluates the terms of :meth:`hidden_fields`.

    **Derivatives (the adjoint fit).** Where the state requires grad the right-hand side is differentiable in
    ``m`` and in ``(Z, rho)``, with the eigenvectors ``U`` held constant: the adiabatic approximation the flow
    already makes (:data:`ADIABATIC_EIGENVECTORS`), applied to the derivative too. The eigenvalues are the
    Rayleigh quotients ``u_i^T H(m) u_i``, whose first derivative ``D3L[u_i, u_i]`` is exact (Hellmann-Feynman);
    the drift ``grad <H, Sigma>`` is built with ``create_graph`` so that its own derivative (fourth derivatives of
    the loss, one more backward pass) exists. What is left out is ``dU/dm``: exact where the eigenvectors do not
    turn (tested on a quartic with a constant eigenbasis), 0.6-0.9 percent of the gradient on a small tanh net
    (tested). Within a solve the right-hand side is a function of the state given the reference basis ``U_ref``
    of each batch index, which is set at the index's first evaluation and moved only by :meth:`rebase` (which
    :func:`~neuralflow.flows.simulate` calls between output times and ``nf.fit`` never calls: each fit window is
    one batch index with one basis).
    """

    name = "oscillation"
    latex = r"-\eta\left(g+\frac{1}{2}\nabla\langle H,\Sigma\rangle\right)"
    #: The right-hand side of ``dm/dt`` by ``order``.
    LATEX = (latex, latex + r"-\frac{\eta^{2}}{2}PHg")
    solver = {"method": "euler", "options": {"step_size": 0.5}}

    def __init__(
        self,
        problem: Problem,
        lr: float,
        q: float | None = None,
        n_track: int = 4,
        stiffness: float = 1.0,
        max_decay: float = 1.0,
        eig_tol: float = 1e-3,
        order: int = 0,
        lag: float = 0.0,
    ) -> None:
        super().__init__(problem, lr)
        if not problem.thrice_differentiable:
            raise InputError(
                f"OscillationFlow needs third derivatives of the loss (D3L), but problem {problem.name!r} is not "
                "smooth enough (e.g. a ReLU net); use a smooth activation (tanh, gelu)."
            )
        if q is None:
            q = roundoff_variance(problem.theta0)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not q >= 0:
            raise InputError(f"OscillationFlow: q must be a non-negative variance per step, got {q!r}.")
        check_positive_int(n_track, "OscillationFlow: n_track")
        for what, v in (("stiffness", stiffness), ("max_decay", max_decay), ("eig_tol", eig_tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InputError(f"OscillationFlow: {what} must be a positive number, got {v!r}.")
        self.q = float(q)
        self.n_track = min(n_track, problem.dim)
        self.stiffness = float(stiffness)
        self.max_decay = float(max_decay)
        self.eig_tol = float(eig_tol)
        self.order = _check_order(order)
        if isinstance(lag, bool) or not isinstance(lag, (int, float)) or not 0 <= lag <= 0.5:
            raise InputError(
                f"OscillationFlow: lag must be a number of steps in [0, 1/2] (GD's map: 1/2), got {lag!r}."
            )
        if lag and stiffness != 1:
            raise InputError("OscillationFlow: lag is GD's step lag, which has no meaning at stiffness != 1; pass one.")
        self.lag = float(lag)
        self.name = "oscillation1" if self.order else "oscillation"
        self.latex = self.LATEX[self.order]
        self.extra_state = ExtraState(
            OSCILLATION_COVARIANCE.name,
            OSCILLATION_COVARIANCE.symbol,
            (self.n_track + 1, self.n_track),
            OSCILLATION_COVARIANCE.statement,
        )
        self.approximations = (
            MODIFIED_OFF_TRACKED if self.order else CONTINUOUS_TIME_OFF_TRACKED,
            LINEAR_FLOQUET_GROWTH,
            TRACKED_SUBSPACE,
            ADIABATIC_EIGENVECTORS,
            ISOTROPIC_INJECTION,
            SECOND_ORDER_OSCILLATION,
        ) + (() if self.lag else (CONTINUOUS_TIME_COUPLING,))
        self.last: OscillationState | None = None
        self.reset()

    @classmethod
    def latex_of(cls, order: int = 0, **options: object) -> str:
        """The right-hand side of ``dm/dt`` of the flow of this ``order`` in LaTeX."""
        return cls.LATEX[_check_order(order)]

    @classmethod
    def from_trajectory(cls, problem: Problem, trajectory: Trajectory, **options: object) -> OscillationFlow:
        """The flow for ``trajectory``'s run, with no fitted parameter: ``q = nu^2`` + the round-off floor
        (unless ``q`` is among ``options``)."""
        if "q" not in options:
            nu = float(trajectory.meta.get("noise", 0.0))
            options["q"] = nu**2 + roundoff_variance(trajectory.iterates[0].to(problem.device))
        return cls(problem, trajectory.lr, **options)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Forget the warm starts and reference bases before integrating a new trajectory."""
        self._tracks: dict[int, _Track] = {}
        # the first eigen-solve's random start, seeded: the same start gives the same simulation
        self._generator = torch.Generator(device=self.problem.device).manual_seed(0)

    # ----------------------------------------------------------------------------------- the physics
    def rates(self, values: Tensor) -> Tensor:
        """``r_i = stiffness * max(log|1 - lr lambda_i|, -max_decay)``: the growth rate of each amplitude per step."""
        r = torch.log((1 - self.lr * values).abs().clamp_min(torch.finfo(values.dtype).tiny))
        return self.stiffness * r.clamp_min(-self.max_decay)

    def equilibrium(self, rates: Tensor) -> Tensor:
        """Per-direction floor ``q / (2 |r_i|)`` where the oscillation decays; ``q`` (one step's worth) elsewhere."""
        return torch.where(rates < 0, self.q / (2 * rates.abs().clamp_min(torch.finfo(rates.dtype).tiny)), self.q)

    def eigen(
        self, theta: Tensor, index: int = 0, curv: Curvature | None = None, track: _Track | None = None
    ) -> tuple[Tensor, Tensor]:
        """The tracked top-k eigenpairs at ``theta``, warm-started from the last solve of batch index ``index`` (or of
        ``track``)."""
        track = self._tracks.setdefault(index, _Track()) if track is None else track
        curv = Curvature(self.problem, theta) if curv is None else curv
        eig = top_eigenpairs(curv, k=self.n_track, v0=track.block, tol=self.eig_tol, generator=self._generator)
        track.block = eig.block
        return eig.values, eig.vectors

    def initial_extra(self, theta0: Tensor, trajectory: object = None, step: int | None = None) -> Tensor:
        """``X`` at ``theta0``: diagonal, GD's measured variance along each direction (demodulated amplitude squared,
        along GD's i-th tracked eigenvector at ``step``, default the trajectory's first step; at least ``q``) where
        ``trajectory`` has one, else the equilibrium ``q / (2 |r_i|)`` below the edge and ``q`` at or above it.
        The measurement counts below the edge too: after a catapult the sharpness is below ``2/lr`` while the
        oscillation decays from its peak, far above the equilibrium (below the edge without an oscillation the
        demodulated variance sits at the equilibrium, 1e-20 on the digits runs with ``nu = 1e-10``). The start
        may lie above ``2/lr``."""
        theta0 = self.problem.check_theta(theta0, "theta0").detach()
        values, _ = self.eigen(theta0)
        rates = self.rates(values)
        var = self.equilibrium(rates)
        if trajectory is not None and not isinstance(trajectory, Trajectory):
            raise InputError(
                f"OscillationFlow.initial_extra: trajectory must be an nf.Trajectory, got {type(trajectory).__name__}."
            )
        if trajectory is not None:
            osc = trajectory.oscillation
            if osc.amplitude is not None:
                k = int(trajectory.steps[0]) if step is None else int(step)
                row = torch.nonzero(osc.steps == k).flatten()
                if len(row):
                    measured = osc.amplitude[row[0]].to(var).pow(2)
                    n = min(len(measured), len(var))
                    ok = torch.isfinite(measured[:n])
                    var[:n] = torch.where(ok, measured[:n].clamp_min(self.q), var[:n])
        return self.extra_from_covariance(torch.diag(var))

    def covariance(self, extra: Tensor) -> Tensor:
        """``X = E Z E`` (``E = diag(exp(rho))``) from extra states ``(..., k + 1, k)``; shape ``(..., k, k)``."""
        E = torch.exp(extra[..., -1, :])
        return E[..., :, None] * extra[..., :-1, :] * E[..., None, :]

    def extra_from_covariance(self, X: Tensor) -> Tensor:
        """The extra state ``(k + 1, k)`` for a covariance ``X`` (k, k): ``Z = X``, ``rho = 0``."""
        return torch.cat([X, X.new_zeros(1, X.shape[-1])])

    def solve(self, theta: Tensor, extra: Tensor, index: int = 0) -> tuple[Tensor, Tensor]:
        """``(dm/dt, d extra/dt)`` at one state; ``extra`` is ``(Z, rho)`` in the reference basis of ``index``."""
        dm, dextra, _ = self._evaluate(theta.new_full((), math.nan), theta[None], extra[None], [index], ())
        return dm[0], dextra[0]

    def _evaluate(
        self,
        t: Tensor,
        thetas: Tensor,
        extras: Tensor,
        indices: list[int],
        names: tuple[str, ...] | list[str],
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(dm/dt, d extra/dt)`` on a batch ``thetas`` (B, d), ``extras`` (B, k + 1, k) (track ``indices[b]`` for
        row ``b``) plus the unit-coefficient fields of the named hidden-state terms, each ``(B, state_dim)`` (the extra
        part in ``Z`` coordinates: ``dZ = E^{-1} dX E^{-1}``, ``drho = 0``; the lag's rates' change goes where the
        growth's does, its diagonal in ``drho``).

        Differentiable in ``thetas`` and ``extras`` where they require grad (the adjoint's vector-Jacobian
        products): the eigenvectors ``U`` are held fixed (the adiabatic approximation, applied to the derivative
        too), the eigenvalues are the Rayleigh quotients ``u_i^T H(theta) u_i`` (exact first derivative
        ``D3L[u_i, u_i]``, Hellmann-Feynman), the drift is the vector-Jacobian product of the ``H u_b`` graphs
        (its own theta-derivative, fourth derivatives, is then one more backward pass). Without grad the same
        function is evaluated and detached. Cost: one batched gradient graph, ``k`` batched Hessian-vector products
        and one backward pass for the drift, plus a LOBPCG solve only for a state whose warm eigenvectors fail the
        residual test (:meth:`_eigenvectors`).
        """
        graph = torch.is_grad_enabled() and (thetas.requires_grad or extras.requires_grad)
        tracks = [self._tracks.setdefault(b, _Track()) for b in indices]
        state = StateDerivatives(self.problem, thetas, create_graph=graph)
        U, hu = self._eigenvectors(t, thetas, state, tracks)
        for track, u in zip(tracks, U, strict=True):
            if track.U_ref is None:
                track.U_ref = u
        U_ref = torch.stack([u for track in tracks if (u := track.U_ref) is not None])
        values = (U * hu).sum(-1)  # Rayleigh quotients, (B, k)
        r = self.rates(values)
        X = self.covariance(extras)
        X_U = carry_covariance(X, U_ref, U, self.equilibrium(r))
        C = U @ U_ref.transpose(1, 2)
        on_theta = {}  # unit fields of the theta terms; P H g needs g's graph before the drift's backward pass
        if "PHg" in names or self.order:
            Hg = state.hvp(state.g)
            on_theta["PHg"] = -(self.lr**2) * (Hg - ((U @ Hg[..., None]).mT @ U)[:, 0])  # off the tracked U
        lagged = bool(self.lag) or "lag" in names
        X_drift = X_U
        if lagged:  # the drift sees the covariance lag steps ago: X - lag dX/dt
            eye = torch.eye(X_U.shape[-1], dtype=X_U.dtype, device=X_U.device)
            X_dot = r[..., :, None] * X_U + X_U * r[..., None, :] + self.q * eye
            X_drift = X_U - self.lag * X_dot
        XU = X_drift @ U  # grad <H, U^T X U> = sum_b D3L[(X U)_b, u_b]: the vector-Jacobian product of the H u_b
        with torch.enable_grad():
            keep = graph or "lag" in names
            drift = torch.autograd.grad(hu, state.thetas, XU, create_graph=graph, retain_graph=keep)[0]
            if "lag" in names:  # the lag's unit field in dtheta/dt: -lr/2 grad <H, -U^T (dX/dt) U>
                on_theta["lag"] = self.lr / 2 * torch.autograd.grad(hu, state.thetas, X_dot @ U, create_graph=graph)[0]
        on_theta["drift"] = -self.lr * drift
        dm = -self.lr * (state.g + 0.5 * drift)
        if self.order:
            dm = dm + 0.5 * on_theta["PHg"]
        growth = r
        if lagged:  # the growth at the rates lag steps ago: r - lag dr/dt
            r_dot = self._rate_change(thetas, U, values, dm)
            growth = (r - self.lag * r_dot).clamp_min(-self.max_decay)
            if "lag" in names and self.lag:  # d/dtau of tau dr/dt(dm): dm moves with tau through the drift too
                r_dot = r_dot + self.lag * self._rate_change(thetas, U, values, on_theta["lag"])
            r_dot = torch.where(growth > -self.max_decay, r_dot, torch.zeros_like(r_dot))
        R_ref = C.transpose(1, 2) @ (growth[..., None] * C)
        d = R_ref.diagonal(dim1=1, dim2=2)
        N = R_ref - torch.diag_embed(d)
        E = torch.exp(extras[:, -1])
        EE = E[:, :, None] * E[:, None, :]
        inject = C.transpose(1, 2) @ C
        dZ = (N @ X + X @ N + self.q * inject) / EE
        for track, u, rates in zip(tracks, U, r.detach(), strict=True):
            track.U_last, track.rates_last = u, rates
        self.last = OscillationState(
            values[-1].detach(), U[-1], X_U[-1].detach(), r[-1].detach(), state.losses[-1].detach()
        )
        fields = {}
        zero_m, zero_rho = torch.zeros_like(dm), torch.zeros_like(d)[:, None]
        for name in names:
            theta_part, rho_part = on_theta.get(name, zero_m), zero_rho
            if name == "floquet":
                A = 0.5 * (R_ref @ X + X @ R_ref)
            elif name == "floquet_linear":
                L_ref = C.transpose(1, 2) @ ((self.lr * values - 2)[..., None] * C)
                A = 0.5 * (L_ref @ X + X @ L_ref)
            elif name == "amplitude":
                A = X @ X
            elif name == "floor":
                A = inject
            elif name == "lag":  # the rates' change -dr/dt per unit lag, split as the growth is (diagonal in rho)
                R_dot = C.transpose(1, 2) @ (r_dot[..., None] * C)
                rho_part = -R_dot.diagonal(dim1=1, dim2=2)[:, None]
                A = -(R_dot @ X + X @ R_dot) - (rho_part.mT + rho_part) * X  # the off-diagonal part of -dR/dt
            else:  # a term of dtheta/dt alone (drift, PHg)
                A = torch.zeros_like(X)
            fields[name] = self.join(theta_part, torch.cat([A / EE, rho_part], dim=1))
        dextra = torch.cat([dZ, d[:, None]], dim=1)
        if not graph:
            return dm.detach(), dextra.detach(), {n: f.detach() for n, f in fields.items()}
        return dm, dextra, fields

    def _rate_change(self, thetas: Tensor, U: Tensor, values: Tensor, dm: Tensor) -> Tensor:
        """``dr_i/dt = lr / (lr lambda_i - 1) dlambda_i/dt`` along ``dm/dt``, ``(B, k)``, detached; 0 where the rate
        is clamped at ``-max_decay`` (near ``lr lambda = 1``, where it does not move). ``dlambda_i/dt =
        D3L[u_i, u_i, dm/dt]`` is a forward difference of the Rayleigh quotients over a step of 1e-4 (at least the
        square root of the dtype's epsilon) along ``dm/dt``, with ``U`` fixed (the adjoint holds it fixed too)."""
        with torch.no_grad():
            v, lam0 = dm.detach(), values.detach()
            step = max(1e-4, torch.finfo(v.dtype).eps ** 0.5)
            eps = step / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
            moved = StateDerivatives(self.problem, thetas.detach() + eps * v, create_graph=False)
            lam = torch.stack([(U[:, i] * moved.hvp(U[:, i])).sum(-1) for i in range(self.n_track)], dim=1)
            free = (1 - self.lr * lam0).abs() > math.exp(-self.max_decay)
            slope = self.lr / torch.where(free, self.lr * lam0 - 1, torch.ones_like(lam0))
            return torch.where(free, slope * (lam - lam0) / eps, torch.zeros_like(lam0))

    @torch.enable_grad()  # the drift differentiates the products again
    def _eigenvectors(
        self,
        t: Tensor,
        thetas: Tensor,
        state: StateDerivatives,
        tracks: list[_Track],
    ) -> tuple[Tensor, Tensor]:
        """The tracked eigenvectors ``U`` (B, k, d), detached, and ``H u_i`` (B, k, d) from ``state``'s graph.

        Each state's warm block (its track's last eigenvectors; at the track's first time ``t0``, e.g. a fit
        window's start, the eigenvectors found there the first time, so that every solve from the same start
        sees the same sequence) is refined by one Rayleigh-Ritz step on the batched products ``H u`` the drift
        needs anyway; where its residual ``||H u_i - lambda_i u_i||`` exceeds ``eig_tol |lambda_1|`` a warm LOBPCG
        replaces it (and the products are recomputed). Along a solve the eigenvectors turn little per half
        step, so most evaluations skip the eigen-solver.
        """
        k = self.n_track
        time = float(t.detach())
        for track in tracks:
            if track.t0 is not None and time == track.t0:
                track.block = track.block0
        blocks = [track.block for track in tracks if track.block is not None]
        if len(blocks) == len(tracks):
            U0 = torch.stack([block[:k] for block in blocks])
            hu = torch.stack([state.hvp(U0[:, i]) for i in range(k)], dim=1)
            M = U0 @ hu.detach().mT
            lam, Q = torch.linalg.eigh(0.5 * (M + M.mT))
            Q = Q.flip(-1)  # descending eigenvalues
            overlap = Q.diagonal(dim1=1, dim2=2)  # u_i's overlap with the warm u_i: keep the signs
            Q = Q * torch.where(overlap < 0, -1.0, 1.0).to(Q)[:, None]
            U, hu = Q.mT @ U0, Q.mT @ hu
            residual = (hu.detach() - lam.flip(-1)[..., None] * U).norm(dim=-1)
            fresh = (residual > self.eig_tol * lam.abs().amax(-1, keepdim=True).clamp_min(1e-12)).any(-1)
        else:
            U, hu, fresh = None, None, torch.ones(len(tracks), dtype=torch.bool)
        if bool(fresh.any()):
            warm: list[Tensor | None] = [None] * len(tracks) if U is None else list(U)
            fields = zip(thetas.detach(), tracks, fresh.tolist(), warm, strict=True)
            U = torch.stack(
                [
                    u if u is not None and not bad else self.eigen(theta, track=track)[1]
                    for theta, track, bad, u in fields
                ]
            )
            hu = torch.stack([state.hvp(U[:, i]) for i in range(k)], dim=1)
        for track, u in zip(tracks, U, strict=True):
            track.block = u
            if track.t0 is None:
                track.t0, track.block0 = time, u
        assert hu is not None  # set with U, by the warm check or by the fresh solves
        return U, hu

    def hidden_coefficients(self) -> dict[str, float]:
        """The physics' coefficients of the hidden-state terms (per tracked direction ``ds/dt = 2 s r + q``, the drift
        ``-lr/2 grad <H, Sigma>``, the backward-error term ``-(lr^2/2) P H g`` at GD's 1/2 with ``order=1``, else 0:
        continuous time, the couplings' ``lag``); the linearised growth and the amplitude-dependent rate are absent
        (0). ``lag`` only at ``stiffness`` 1, where GD's step lag has a meaning."""
        own = {"floquet": 2.0, "floquet_linear": 0.0, "amplitude": 0.0, "floor": self.q, "drift": 0.5}
        lag = {"lag": self.lag} if self.stiffness == 1 else {}  # GD's step lag has no meaning off stiffness 1
        return {**own, "PHg": 0.5 * self.order, **lag}

    def hidden_fields(self, t: Tensor, y: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        batch = self._check_state(y)
        thetas, extras = self.split(batch)
        assert extras is not None  # the flow carries extra state
        dm, dextra, fields = self._evaluate(t, thetas, extras, list(range(len(batch))), names)
        return self.join(dm, dextra), fields

    def _check_state(self, y: Tensor) -> Tensor:
        """``y`` as a ``(B, state_dim)`` batch."""
        batch = y if y.dim() == 2 else y.unsqueeze(0)
        if batch.shape[-1] != self.state_dim:
            raise InputError(
                f"OscillationFlow: the ODE state is [theta (d = {self.problem.dim}), Z ({self.n_track}^2), rho "
                f"({self.n_track})], length {self.state_dim}; got {batch.shape[-1]}. Build it with "
                "flow.join(theta, flow.extra_from_covariance(X))."
            )
        return batch

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        res = self.hidden_fields(t, y, [])[0]
        return res if y.dim() == 2 else res[0]

    def rebase(self, y: Tensor) -> Tensor:
        """Fold ``E`` into ``Z``, carry ``X`` into the last evaluation's eigenvectors and make them the reference
        basis (:func:`carry_covariance`, with the equilibrium floor for a direction that entered the tracked set),
        projected onto the PSD cone; ``rho = 0`` after it."""
        batch = y if y.dim() == 2 else y.unsqueeze(0)
        thetas, extras = self.split(batch)
        assert extras is not None  # the flow carries extra state
        out = []
        for b in range(len(batch)):
            track = self._tracks.get(b)
            if track is None or track.U_last is None or track.U_ref is None or track.rates_last is None:
                out.append(batch[b])
                continue
            X = carry_covariance(
                self.covariance(extras[b]), track.U_ref, track.U_last, self.equilibrium(track.rates_last)
            )
            track.U_ref = track.U_last
            out.append(self.join(thetas[b], self.extra_from_covariance(project_psd(X))))
        res = torch.stack(out)
        return res if y.dim() == 2 else res[0]

    def warm_tensors(self) -> dict[str, Tensor]:
        """Per batch index ``b``: ``block.b`` (eigen-solver warm start), ``U_ref.b`` (the basis of the state's ``X``),
        ``U_last.b`` and ``rates_last.b``."""
        out = {}
        for b, track in self._tracks.items():
            if b < 0:  # state_at's own track
                continue
            for name in ("block", "U_ref", "U_last", "rates_last"):
                value = getattr(track, name)
                if value is not None:
                    out[f"{name}.{b}"] = value.clone()
        return out

    def load_warm_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.reset()
        for key, value in tensors.items():
            name, _, b = key.partition(".")
            if name not in ("block", "U_ref", "U_last", "rates_last") or not b.isdigit():
                raise InputError(f"OscillationFlow: unknown warm tensor {key!r}.")
            setattr(self._tracks.setdefault(int(b), _Track()), name, value.to(self.problem.device))

    # ------------------------------------------------------------------------------- predictions
    def state_at(self, theta: Tensor, extra: Tensor) -> OscillationState:
        """Evaluate at ``(theta, extra)``, ``X`` in the eigenbasis at ``theta`` (as :func:`simulate` returns it, up to
        the rotation of the last half step); uses its own warm start, so a simulation in progress is untouched."""
        track = self._tracks.setdefault(-1, _Track())
        track.U_ref = None
        with torch.no_grad():
            self.solve(self.problem.check_theta(theta, "state").detach(), extra, -1)
        assert self.last is not None
        return self.last

    def predicted_variance(self, extra: Tensor) -> Tensor:
        """The predicted oscillation variance along the tracked eigenvectors, ``tr X`` (basis-free), per state."""
        return self.covariance(extra).diagonal(dim1=-2, dim2=-1).sum(dim=-1)

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "q": self.q,
            "n_track": self.n_track,
            "stiffness": self.stiffness,
            "max_decay": self.max_decay,
            "eig_tol": self.eig_tol,
            "order": self.order,
            "lag": self.lag,
        }
