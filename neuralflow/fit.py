"""Fitting a physics flow plus a learnable correction to GD iterates (stage 5 of the pipeline).

Multiple shooting: every window starts at an observed (or smoothed) iterate ``x_s`` and the
:class:`~neuralflow.corrections.Hybrid` is integrated over ``window`` steps with torchdiffeq, all
windows batched as the rows of one ``(B, d)`` state. The fit minimises

    loss = E  +  min_norm * E_p * mean ||F_a(x_s)||^2 / mean ||F_p(x_s)||^2
    E    = mean_{windows, outputs k} ||theta(t_s + k) - x_{s+k}||^2 / D

``D`` (the *normaliser*) is the mean squared displacement ``||x_{s+k} - x_s||^2`` of the targets
over the same windows and outputs, so an error of 1 is as bad as standing still and numbers are
comparable across problems. The second term is the APHYNITY penalty (Yin et al., ICLR 2021)
on the correction's size relative to the physics field ``F_p`` at the window
starts, weighted by the physics-only error ``E_p`` on the training windows: the physics keeps what
it explains, and the bias on a needed correction is about ``min_norm (||F_a|| / ||F_p||)^2``
relative, on any problem.

A model whose flow carries state beyond ``theta`` (``flow.extra_state``, e.g. a
:class:`~neuralflow.corrections.HiddenStateLibrary` on a flow with an oscillation variance) is integrated on
its whole ODE state ``[theta, extra]``; each window starts from the flow's ``initial_extra`` at the window's
first iterate and step, which reads the trajectory's measurement (``Trajectory.oscillation``) where there is
one; with ``extra_start="fitted"`` every window's start of the extra state is a parameter of its own
(initialised there) fitted with the correction, for runs where nothing is measured. The loss is ``E`` on
``theta``, plus, with ``variance_weight=w > 0``, the measured oscillation variance in log scale:

    loss = E + w * mean_{windows, outputs k: measured} (log s_model - log s_measured)^2

``s_model`` the flow's predicted variance (``flow.predicted_variance``, ``tr X``), ``s_measured`` GD's demodulated
variance along its tracked eigenvectors (``Trajectory.oscillation.variance``), over the outputs where the
measurement is above its floor (:func:`_measured_log_variance`). Both parts are dimensionless: ``E`` is 1 for
standing still, the variance term 1 for being off by a factor ``e`` everywhere, so ``w = 1`` asks as much of a
factor ``e`` in the variance as of the whole displacement. The window errors and the validation loss stay on
``theta``. The APHYNITY term is left out (weight 0): a hidden-state library's parameters are already the
relative revision of the physics' coefficients.

Gradients come from ``torchdiffeq.odeint_adjoint`` (adjoint parameters = the correction's
parameters, seminorm) or from backpropagation through ``odeint`` (``method="direct"``); LBFGS and
Adam use them. The default optimiser for at most 64 parameters is Gauss-Newton /
Levenberg-Marquardt with the sensitivities ``J`` of the window states to each parameter by finite
differences (one forward solve per parameter, no backward pass). Constant coefficients of a term
library enter the right-hand side linearly, so it converges in a handful of iterations where a
plain LBFGS loop crawls. ``method="regression"`` is the SINDy-style baseline (Brunton et al. 2016): least
squares of a 5-point finite-difference derivative of the targets minus the physics on the
unit-coefficient fields; it is instant, and the default initial guess of the ODE fit. For gated
coefficients it evaluates the fields and the gate inputs once at the targets and fits the gate
networks by full-batch LBFGS over those precomputed tensors (no ODE solve and no eigen-solve in the
loop): the cheap route at the edge of stability, where every right-hand side needs eigen-solves.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from tqdm.auto import tqdm

from ._display import columns, data_frame, html_table
from .corrections import FEATURES, HiddenStateLibrary, Hybrid, TermLibrary
from .errors import DivergenceError, FileFormatError, InputError, Interrupted
from .problems import Problem, check_positive_int
from .trajectory import Trajectory

if TYPE_CHECKING:
    from .report import Report

__all__ = ["fit", "fit_runs", "fit_loss", "coefficient_profile", "FitResult", "JointFitResult"]

_FIXED_GRID = ("rk4", "euler", "midpoint", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams")
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_OPTIMIZERS = ("auto", "gauss-newton", "lbfgs", "adam")
_DEFAULT_ITERS = {"gauss-newton": 20, "lbfgs": 100, "adam": 500}
_SWITCH_OPEN = 0.01  # a gate whose switch stays below this at every point counts as off
_GN_MAX_PARAMS = 64  # finite-difference sensitivities cost one solve per parameter
_GATED_REGRESSION_ITERS = 200  # LBFGS iterations of the gated regression (precomputed tensors, no solves)
# the demodulated variance counts where it exceeds (this * ||m_{k+1} - m_k||)^2: below the edge on the digits runs
# it sits at ratios 2e-8 to 6e-8, where the injected noise's own equilibrium q / (2 |r|) explains it
_VARIANCE_FLOOR_RATIO = 1e-8


@dataclass
class FitResult:
    """What :func:`fit` found.

    ``coefficients`` are dimensionless (the term table in the README; a gated coefficient is its mean over
    the window starts, for a baseline-gated term its baseline plus the mean change: the report shows the two
    apart) with ``uncertainty`` their standard errors: Gauss-Newton sandwich
    covariance clustered by window (the spread of the windows' estimating equations), mapped to
    the coefficients by the delta method; for ``method="regression"`` the ordinary least-squares
    error. Errors are normalised by the mean squared displacement (see :mod:`neuralflow.fit`);
    ``physics_error`` and ``hybrid_error`` are means over the validation windows (over the
    training windows when there are none). ``windows`` holds each window's start ``step`` and
    whether it is a ``validation`` window.
    """

    model: Hybrid
    coefficients: dict[str, float]
    uncertainty: dict[str, float]
    history: list[dict[str, float]]
    window_errors: Tensor
    physics_window_errors: Tensor
    physics_error: float
    hybrid_error: float
    timing: dict[str, float]
    settings: dict[str, Any]
    trajectory: Trajectory
    n_function_evals: int
    windows: dict[str, Tensor] = field(default_factory=dict)
    normaliser: float = math.nan

    @property
    def improvement(self) -> float:
        """``physics_error / hybrid_error`` on the validation windows (> 1: the correction helps)."""
        return self.physics_error / self.hybrid_error if self.hybrid_error > 0 else math.inf

    def report(self, **options: Any) -> Report:
        """The readable report of this fit (:func:`neuralflow.report.build_report`; ``options`` go there)."""
        from .report import build_report

        return build_report(self, **options)

    def save(self, path: str | os.PathLike, report: Report | bool = True) -> Path:
        """Write this fit to a checkpoint (:func:`neuralflow.checkpoint.save`); ``nf.load`` reads it back."""
        from .checkpoint import save

        return save(self, path, report=report)

    def _repr_html_(self) -> str:
        settings = self.settings
        rows = [(name, f"{value:+.6g}", f"{self.uncertainty.get(name, math.nan):.2g}")
                for name, value in self.coefficients.items()]
        caption = (f"fit of {settings.get('model', {}).get('flow', {}).get('name', 'physics')} + correction, "
                   f"window {settings.get('window')}, {settings.get('method')}: error physics "
                   f"{self.physics_error:.4g} -> hybrid {self.hybrid_error:.4g}, "
                   f"{self.timing.get('total', math.nan):.3g} s")
        return html_table(("term", "coefficient", "standard error"), rows, caption)

    def __repr__(self) -> str:
        unc = self.uncertainty
        coeffs = ", ".join(f"{k}={v:.4g}+-{unc.get(k, math.nan):.2g}" for k, v in self.coefficients.items())
        return (
            f"FitResult({coeffs}; error physics {self.physics_error:.4g} -> hybrid {self.hybrid_error:.4g}, "
            f"{len(self.history)} iterations, {self.timing.get('total', math.nan):.3g} s)"
        )


class _SolverFailure(Exception):
    pass


class _Counted(torch.nn.Module):
    """The model, counting right-hand-side evaluations."""

    def __init__(self, model: Hybrid) -> None:
        super().__init__()
        self.model = model
        self.n = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.n += 1
        return self.model(t, y)


@dataclass
class _Windows:
    t: Tensor  # (n_out + 1,) step times relative to the window start
    steps: Tensor  # (W,) step of each window start
    targets: Tensor  # (n_out + 1, W, d); targets[0] are the starting states
    train: Tensor  # indices of training windows
    val: Tensor  # indices of validation windows
    normaliser: float


def _make_windows(
    targets: Trajectory, window: int, stride: int, val_fraction: float, seed: int, dtype: torch.dtype,
    device: torch.device, exclude: Sequence[tuple[int, int]] = (),
) -> _Windows:
    every = targets.store_every
    if window % every:
        raise InputError(
            f"fit: window={window} steps is not a multiple of the recording interval ({every} steps); "
            f"choose a multiple of {every}."
        )
    if stride % every:
        raise InputError(f"fit: stride={stride} steps is not a multiple of the recording interval ({every} steps).")
    n_out, hop = window // every, stride // every
    T = len(targets)
    if T < n_out + 1:
        raise InputError(
            f"fit: the trajectory holds {T} stored iterates (steps {int(targets.steps[0])}..{int(targets.steps[-1])}) "
            f"but a window of {window} steps needs {n_out + 1}; use a smaller window or a longer run."
        )
    x = targets.iterates.to(dtype=dtype, device=device)
    starts = torch.arange(0, T - n_out, hop, device=device)
    first = targets.steps.to(device)[starts]
    kept = torch.ones(len(starts), dtype=torch.bool, device=device)
    reach = 3 * every  # the regression's 5-point stencil on smoothed targets reads GD steps up to 3 away
    for lo, hi in exclude:  # a window spans steps [first, first + window]; drop it if it comes near [lo, hi)
        kept &= (first + window + reach < lo) | (first - reach >= hi)
    if not bool(kept.any()):
        raise InputError(f"fit: exclude={list(exclude)} removes every window; exclude less of the trajectory.")
    starts = starts[kept]
    idx = starts[None, :] + torch.arange(n_out + 1, device=device)[:, None]
    tgt = x[idx]
    n = len(starts)
    if not 0 <= val_fraction < 1:
        raise InputError(f"fit: val_fraction must be in [0, 1), got {val_fraction!r}.")
    n_val = min(int(round(val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    disp = (tgt[1:] - tgt[:1]).square().sum(-1).mean()
    if not disp > 0:
        raise InputError("fit: the targets do not move within the windows; there is nothing to fit.")
    t = torch.arange(0, window + 1, every, dtype=dtype, device=device)
    return _Windows(t, targets.steps.to(device)[starts], tgt, train, val, float(disp))


class _Objective:
    """Window solves, residuals and the fit loss for one model and one set of windows.

    Every solve integrates all windows (training and validation) as one batch: the right-hand
    side's cost is dominated by per-call overhead on small problems, so the validation error
    comes almost free with each training evaluation.
    """

    def __init__(
        self, model: Hybrid, win: _Windows, method: str, solver: str, options: dict[str, Any], rtol: float,
        atol: float, min_norm: float, start: Tensor, fitted_start: bool = False,
        variance: tuple[float, Tensor, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.variance = variance  # (weight, measured log variance (n_out + 1, W), mask) or None
        self._start = start  # (W, state_dim): the windows' first iterates, joined with their extra state
        self.counted = _Counted(model)
        self.win = win
        self.method = method
        self.solver = solver
        self.options = options
        self.rtol, self.atol = rtol, atol
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = list(self.model_params)
        self.start_extra: torch.nn.Parameter | None = None
        if fitted_start:  # a learnable start of the extra state per window (nuisance parameters, after the model's)
            self.start_extra = torch.nn.Parameter(model.flow.split(start)[1].reshape(len(start), -1).clone())
            self.params.append(self.start_extra)
        self.last_jacobian: Tensor | None = None
        self.val_loss = math.nan
        self.last_errors: Tensor | None = None
        physics = Hybrid(model.flow, None)
        self.physics_errors = self.errors(self.solve(self.start, grad=False, model=physics))
        self.penalty_weight = 0.0
        if model.extra_state is None:
            with torch.no_grad():
                size = float(physics(win.t[0], win.targets[0, win.train]).square().sum(-1).mean())
            # APHYNITY weight relative to the physics' own error, so the bias it puts on a needed
            # correction is ~ min_norm (||F_a|| / ||F_p||)^2 whatever the problem.
            self.penalty_weight = min_norm * float(self.physics_errors[win.train].mean()) / max(size, 1e-300)
        lib = model.correction
        self.batched_sensitivities = (
            isinstance(lib, TermLibrary) and not lib.gated and solver in _FIXED_GRID
            and len(self.params) == len(lib.terms)
        )

    @property
    def start(self) -> Tensor:
        """The windows' initial ODE states ``(W, state_dim)`` (differentiable in the fitted extra-state starts)."""
        if self.start_extra is None:
            return self._start
        return torch.cat([self._start[:, :self.win.targets.shape[-1]], self.start_extra], dim=1)

    def solve(self, y0: Tensor, grad: bool, model: torch.nn.Module | None = None) -> Tensor:
        """Integrate from the rows of ``y0`` over the window's output times, ``(n_out + 1, B, d)``."""
        func = self.counted if model is None else model
        kw = {"method": self.solver, "options": self.options, "rtol": self.rtol, "atol": self.atol}
        try:
            if grad and self.method == "adjoint":
                sol = odeint_adjoint(
                    func, y0, self.win.t, adjoint_params=tuple(self.model_params),
                    adjoint_options={**self.options, "norm": "seminorm"}, **kw,
                )
            elif grad:
                sol = odeint(func, y0, self.win.t, **kw)
            else:
                with torch.no_grad():
                    sol = odeint(func, y0, self.win.t, **kw)
        except (AssertionError, RuntimeError) as exc:  # torchdiffeq signals "underflow in dt" by assertion
            raise _SolverFailure(f"the ODE solver failed ({exc})") from None
        if not torch.isfinite(sol).all():
            raise _SolverFailure("the ODE solution became non-finite")
        return sol

    def errors(self, sol: Tensor) -> Tensor:
        """Normalised mean squared distance of each window to its targets, ``(W,)``."""
        d = self.win.targets.shape[-1]
        return (sol[1:, ..., :d] - self.win.targets[1:]).square().sum(-1).mean(0).detach() / self.win.normaliser

    def _residuals(self, sol: Tensor, fa: Tensor | None) -> Tensor:
        """Residual vector (trajectory, variance, penalty) of the training windows; loss = its squared norm."""
        idx = self.win.train
        n_out, B, d = sol.shape[0] - 1, len(idx), self.win.targets.shape[-1]
        traj = (sol[1:, idx, :d] - self.win.targets[1:, idx]) / math.sqrt(n_out * B * self.win.normaliser)
        parts = [traj.reshape(-1)]
        if self.variance is not None:
            parts.append(self._variance_residuals(sol[1:, idx]))
        if fa is not None:
            parts.append(fa.reshape(-1) * math.sqrt(self.penalty_weight / B))
        return torch.cat(parts)

    def _variance_residuals(self, sol: Tensor) -> Tensor:
        """``sqrt(w / n) (log s_model - log s_measured)`` at the measured outputs of the training windows (0 elsewhere,
        so that the residual vector keeps its length)."""
        weight, measured, mask = self.variance
        idx = self.win.train
        measured, mask = measured[1:, idx], mask[1:, idx]
        model = self.model.flow.predicted_variance(self.model.flow.split(sol)[1])
        gap = torch.log(model.clamp_min(torch.finfo(model.dtype).tiny)) - measured
        n = max(int(mask.sum()), 1)
        return (torch.where(mask, gap, 0.0) * math.sqrt(weight / n)).reshape(-1)

    def _penalised(self) -> bool:
        return self.model.correction is not None and self.penalty_weight > 0

    def residuals(self, grad: bool) -> Tensor:
        """Residual vector at the current parameters; also updates :attr:`val_loss`."""
        sol = self.solve(self.start, grad)
        self.last_errors = self.errors(sol)
        if len(self.win.val):
            self.val_loss = float(self.last_errors[self.win.val].mean())
        fa = None
        if self._penalised():
            with torch.set_grad_enabled(grad):
                fa = self.model.correction(self.win.t[0], self.win.targets[0, self.win.train])
        return self._residuals(sol, fa)

    def loss_and_grad(self) -> tuple[float, Tensor]:
        loss = self.residuals(grad=True).square().sum()
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)])
        return float(loss.detach()), flat

    def get(self) -> Tensor:
        return torch.nn.utils.parameters_to_vector(self.params).detach().clone()

    def set(self, vec: Tensor) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vec, self.params)

    def jacobian(self, base: Tensor, r0: Tensor) -> Tensor:
        """``d residuals / d parameters`` by one-sided finite differences, ``(R, P)``.

        For a constant-coefficient library on a fixed grid, the ``P`` perturbed models run as one
        batched solve (each copy of the windows with its own coefficients).
        """
        steps = 1e-4 * base.abs().clamp_min(1.0)
        if self.batched_sensitivities:
            cols = self._batched_differences(base, steps)
        else:
            cols = []
            for j in range(len(base)):
                shifted = base.clone()
                shifted[j] += steps[j]
                self.set(shifted)
                cols.append(self.residuals(grad=False))
            self.set(base)
        self.last_jacobian = torch.stack([(c - r0) / h for c, h in zip(cols, steps)], dim=1)
        return self.last_jacobian

    def _batched_differences(self, base: Tensor, steps: Tensor) -> list[Tensor]:
        lib = self.model.correction
        P = len(base)
        start = self.start
        W = start.shape[0]
        rows = base.expand(P, P) + torch.diag(steps)  # copy j has coefficient j shifted
        lib._row_constants = rows.repeat_interleave(W, dim=0)
        try:
            sol = self.solve(start.repeat(P, 1), grad=False)
            fa = None
            if self._penalised():
                starts = self.win.targets[0, self.win.train]
                lib._row_constants = rows.repeat_interleave(len(starts), dim=0)
                with torch.no_grad():
                    fa = lib(self.win.t[0], starts.repeat(P, 1)).reshape(P, len(starts), -1)
        finally:
            lib._row_constants = None
        sol = sol.reshape(sol.shape[0], P, W, -1)
        return [self._residuals(sol[:, j], None if fa is None else fa[j]) for j in range(P)]


def _five_point_derivative(x: Tensor, h: float) -> Tensor:
    """``x'(t_i)`` at interior points ``i = 2..T-3`` by the 5-point central difference, error O(h^4)."""
    return (x[:-4] - 8 * x[1:-3] + 8 * x[3:-1] - x[4:]) / (12 * h)


@dataclass
class _RegressionSystem:
    """The derivative regression reduced to per-point Gram quantities (no ``(N, d)`` tensor is kept).

    At each interior point ``x_i`` of the training windows: ``b_i = x'_i - F_p(x_i)`` (5-point
    finite-difference velocity of the targets minus the physics) and ``A_i`` the ``(d, P)`` matrix of
    unit-coefficient fields; stored are ``G_i = A_i^T A_i`` ``(N, P, P)``, ``h_i = A_i^T b_i``
    ``(N, P)``, ``q_i = ||b_i||^2`` and ``f_i = ||F_p(x_i)||^2`` ``(N,)``, so that for coefficients
    ``c_i`` at ``x_i`` the residual is ``||b_i - A_i c_i||^2 = q_i - 2 c_i.h_i + c_i^T G_i c_i`` and the
    correction's size is ``||F_a(x_i)||^2 = c_i^T G_i c_i``. For a gated library also the gate inputs
    ``lr S - 2`` ``(N,)``, the features ``(N, F)`` and the amplitude features ``(N, A)`` (or None).
    ``steps`` ``(N,)`` are the points' GD steps.
    """

    G: Tensor
    h: Tensor
    q: Tensor
    f: Tensor
    d: int
    steps: Tensor
    lr_S_minus_2: Tensor | None = None
    features: Tensor | None = None
    amplitude: Tensor | None = None

    def subset(self, mask: Tensor) -> _RegressionSystem:
        """The same regression restricted to the points ``mask`` selects."""
        pick = {name: getattr(self, name) for name in ("G", "h", "q", "f", "steps", "lr_S_minus_2", "features",
                                                       "amplitude")}
        return replace(self, **{name: None if t is None else t[mask] for name, t in pick.items()})


def _regression_system(model: Hybrid, targets: Trajectory, win: _Windows, balance: bool = False) -> _RegressionSystem:
    """Evaluate the regression's fields, targets and gate inputs once, at the training windows' interior points.

    ``balance=True`` returns the system weighted as in :func:`_balanced` over ``window + 1`` points.
    """
    lib = model.correction
    # a gated library's gate inputs need eigen-solves: one state per evaluation, each warm-started
    # from the previous point's; constant coefficients batch the points
    chunk = 1 if lib.gated else 256
    h = float(targets.store_every)
    x = targets.iterates.to(dtype=model.problem.dtype, device=model.problem.device)
    if len(x) < 5:
        raise InputError("fit: method='regression' needs at least 5 stored iterates for its 5-point derivative.")
    deriv = _five_point_derivative(x, h)
    steps = targets.steps.to(x.device)[2:-2]
    window = float(win.t[-1])
    starts = win.steps[win.train]
    inside = ((steps[:, None] >= starts[None, :]) & (steps[:, None] <= starts[None, :] + window)).any(1)
    pts, deriv, steps = x[2:-2][inside], deriv[inside], steps[inside]
    if len(pts) == 0:
        raise InputError("fit: no interior point of the training windows is available for the regression.")
    G, hs, q, f, gate_in, feats, amps = [], [], [], [], [], [], []
    t0 = win.t[0]
    for lo in range(0, len(pts), chunk):
        xs = pts[lo : lo + chunk]
        with torch.no_grad():
            fp = model.flow(t0, xs)
        b = deriv[lo : lo + chunk] - fp
        ctx = lib._context(xs)  # one set of derivatives (and eigen-solves) for the fields and the gate inputs
        A = torch.stack([spec(ctx).detach() for spec in lib.specs], dim=2)  # (n, d, P)
        G.append(A.transpose(1, 2) @ A)
        hs.append(torch.einsum("ndp,nd->np", A, b))
        q.append(b.square().sum(1))
        f.append(fp.square().sum(1))
        if lib.gated:
            gate_in.append(FEATURES["lr_S_minus_2"](ctx).detach())
            feats.append(lib._features(ctx).detach())
            if lib.amplitude_names:
                amps.append(lib._amplitude(ctx).detach())
    system = _RegressionSystem(
        torch.cat(G), torch.cat(hs), torch.cat(q), torch.cat(f), x.shape[1], steps,
        torch.cat(gate_in) if lib.gated else None, torch.cat(feats) if lib.gated else None,
        torch.cat(amps) if amps else None,
    )
    return _balanced(system, int(window) + 1) if balance else system


def _least_squares(system: _RegressionSystem) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form SINDy least squares ``x' - F_p(x) = sum_i c_i F_i(x)`` with constant ``c``.

    Returns ``(coef, OLS se, residual sum of squares)``.
    """
    AtA, Atb, btb = system.G.sum(0), system.h.sum(0), system.q.sum()
    P = len(Atb)
    scale = AtA.diagonal().clamp_min(torch.finfo(AtA.dtype).tiny).sqrt()
    M = AtA / scale[:, None] / scale[None, :]
    Minv = torch.linalg.pinv(M, hermitian=True, rtol=1e-13)
    coef = (Minv @ (Atb / scale)) / scale
    n_rows = len(system.q) * system.d
    rss = (btb - 2 * coef @ Atb + coef @ AtA @ coef).clamp_min(0)
    s2 = rss / max(n_rows - P, 1)
    se = (s2 * Minv.diagonal()).sqrt() / scale
    return coef, se, rss


def _balanced(system: _RegressionSystem, span: int) -> _RegressionSystem:
    """The regression with point ``i`` weighted by ``1 / mean ||b_j||^2`` over the ``span`` points around it.

    Weights are normalised to mean 1. A short transient whose velocity residual is orders of
    magnitude larger than elsewhere (a catapult at the edge of stability) then counts like any
    other stretch of the trajectory instead of deciding the least squares alone.
    """
    q = system.q
    k = max(1, min(span, len(q)) // 2 * 2 + 1)
    local = torch.nn.functional.pad(q[None, None], (k // 2, k // 2), mode="replicate")[0, 0].unfold(0, k, 1).mean(1)
    w = 1.0 / local.clamp_min(torch.finfo(q.dtype).tiny)
    w = w / w.mean()
    return replace(system, G=system.G * w[:, None, None], h=system.h * w[:, None], q=q * w, f=system.f * w)


def _regression(model: Hybrid, targets: Trajectory, win: _Windows, balance: bool = False) -> tuple[Tensor, Tensor]:
    """SINDy-style least squares (Brunton et al. 2016) at interior points of the training windows.

    Returns the coefficients and their ordinary least-squares standard errors.
    """
    coef, se, _ = _least_squares(_regression_system(model, targets, win, balance))
    return coef, se


class CoefficientProfile(dict):
    """What :func:`coefficient_profile` returns: a dict (``step``, ``coefficients``, ``se``, ``unexplained``)."""

    def to_frame(self) -> Any:
        """One row per bin (indexed by its first step): each term's coefficient, ``se_<term>``, ``unexplained``."""
        cols = {"step": self["step"], **self["coefficients"], **{f"se_{k}": v for k, v in self["se"].items()},
                "unexplained": self["unexplained"]}
        return data_frame(columns(cols)).set_index("step")


def coefficient_profile(
    model: Hybrid, trajectory: Trajectory, bin: int = 20, target: str = "smoothed",
    exclude: Sequence[tuple[int, int]] = (),
) -> CoefficientProfile:
    """Each term's coefficient fitted as a constant bin by bin along the trajectory: ``c(t)`` free of any gate model.

    In every bin of ``bin`` consecutive steps, the derivative regression of :func:`fit`
    (``method="regression"``: ``x' - F_p(x) = sum_i c_i F_i(x)`` with the 5-point velocity of the
    targets) is solved on its own, with the library's terms as unit-coefficient fields (gates and
    amplitudes play no part). Where a coefficient is a function of time only through the state, the
    profile is what a gate should learn; where it is not (a hidden variable such as the amplitude of
    the edge-of-stability oscillation), the profile shows it. A term whose field vanishes in a bin
    (``gradScrit`` with no critical eigenvalue) gets 0 there.

    Returns ``{"step": (B,) first step of each bin, "coefficients": {term: (B,)}, "se": {term: (B,)}
    (OLS), "unexplained": (B,)}``, the last the fraction of ``||x' - F_p(x)||^2`` the bin's fit leaves.
    """
    targets = _check_inputs(model, trajectory, target, "regression")
    lib = model.correction
    if not isinstance(lib, TermLibrary):
        raise InputError("coefficient_profile: the model's correction must be a TermLibrary.")
    bin = check_positive_int(bin, "coefficient_profile: bin")
    problem = model.problem
    win = _make_windows(targets, bin, bin, 0.0, 0, problem.dtype, problem.device, _check_exclude(exclude))
    lib.reset_cache()
    system = _regression_system(model, targets, win)
    which = torch.searchsorted(win.steps, system.steps, right=True) - 1
    rows = []
    for k in range(len(win.steps)):
        m = which == k
        if int(m.sum()) == 0:
            continue
        part = system.subset(m)
        coef, se, rss = _least_squares(part)
        q = part.q.sum()
        rows.append((win.steps[k], coef, se, rss / q.clamp_min(torch.finfo(q.dtype).tiny)))
    coefs, ses = torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])
    return CoefficientProfile({
        "step": torch.stack([r[0] for r in rows]),
        "coefficients": {n: coefs[:, j] for j, n in enumerate(lib.terms)},
        "se": {n: ses[:, j] for j, n in enumerate(lib.terms)},
        "unexplained": torch.stack([r[3] for r in rows]),
    })


def _reset_gates(lib: TermLibrary, seed: int) -> None:
    """Gates back to their initial state (amplitude 0, gain 20, margin 0.05, zero last layer), first layers seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in lib.gates.values():
            gate.scale.zero_()
            if hasattr(gate, "base"):
                gate.base.zero_()
            if hasattr(gate, "weights"):
                gate.weights.zero_()
            gate.gain.fill_(20.0)
            gate.margin.fill_(0.05)
            first, last = gate.net[0], gate.net[2]
            bound = 1 / math.sqrt(first.in_features)  # PyTorch's default Linear init, from a seeded generator
            for p in (first.weight, first.bias):
                p.copy_((2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1).to(p.device) * bound)
            last.weight.zero_()
            last.bias.zero_()


def _gated_regression(
    lib: TermLibrary, system: _RegressionSystem, min_norm: float, max_iters: int, init: str, seed: int,
    settings: dict[str, Any], progress: bool,
) -> Tensor:
    """Fit a gated library to the derivative regression by full-batch LBFGS over precomputed tensors.

    Minimises the regression's normalised squared error plus the APHYNITY penalty (Yin et al. 2021),

        R = sum_i ||b_i - A_i c_i||^2 / sum_i ||b_i||^2  +  min_norm mean_i ||F_a(x_i)||^2 / mean_i ||F_p(x_i)||^2,

    (``R = 1`` for the physics alone). Every coefficient is linear in its *linear* parameters given
    the gate shapes: a constant ``c``, or a gated ``base + m(x) (scale + w . a(x))`` with ``m`` the
    switch, ``a`` the amplitude features and ``base`` 0 unless the term has a baseline. Those are
    eliminated in closed form at every evaluation (variable projection, Golub and Pereyra 1973), so
    LBFGS moves only the switches (gain, margin, network). No ODE solve and no eigen-solve runs in
    the loop. A switch below ``_SWITCH_OPEN`` at every point counts as off (its gated part drops
    out, with zero gradient; a baseline term keeps its base), so a gate that starts closed on the
    data, or closes, stays off: the gated part is then absent, not a smooth tail of ``lr S - 2``. The best
    switches seen are kept, whatever the line search does after them. Returns the constants'
    standard errors (OLS, gates held fixed).
    """
    names = lib.terms
    gi = [j for j, n in enumerate(names) if n in lib.gates]
    ci = [j for j, n in enumerate(names) if n not in lib.gates]
    G, h, q = system.G, system.h, system.q
    N, P = h.shape
    w = min_norm * float(q.mean()) / max(float(system.f.mean()), 1e-300)
    total = float(q.sum())
    if init != "current":
        _reset_gates(lib, seed)
    gates = [lib.gates[names[j]] for j in gi]
    amp = system.amplitude
    A = 0 if amp is None else amp.shape[1]
    # linear parameters: the constants, then per gate [scale, w_1..w_A] and its base if it has one
    offsets, k = [], len(ci)
    for gate in gates:
        offsets.append(k)
        k += 1 + A + hasattr(gate, "base")
    K = k

    def coefficients() -> tuple[Tensor, Tensor]:
        """``c_i`` ``(N, P)`` with the linear parameters ``(K,)`` projected out, and those parameters."""
        B = G.new_zeros(N, P, K)
        for k, j in enumerate(ci):
            B[:, j, k] = 1.0
        for j, gate, col in zip(gi, gates, offsets):
            m = gate.switch(system.lr_S_minus_2, system.features)
            if float(m.detach().max()) < _SWITCH_OPEN:
                # a switch that never opens is off: otherwise its exponential tail times a huge scale
                # would stand in for a smooth function of lr S - 2, which is not a gate
                m = m * 0.0  # (kept in the graph: with every gate closed the objective is still differentiable)
            B[:, j, col] = m
            if A:
                B[:, j, col + 1 : col + 1 + A] = m[:, None] * amp
            if hasattr(gate, "base"):
                B[:, j, col + 1 + A] = 1.0
        M = (1 + w) * torch.einsum("npk,npq,nql->kl", B, G, B)
        r = torch.einsum("npk,np->k", B, h)
        d = M.diagonal().clamp_min(torch.finfo(M.dtype).tiny).sqrt()
        eye = torch.eye(K, dtype=M.dtype, device=M.device)
        theta = torch.linalg.solve(M / d[:, None] / d[None, :] + 1e-12 * eye, r / d) / d
        return torch.einsum("npk,k->np", B, theta), theta

    def objective() -> Tensor:
        c, _ = coefficients()
        quad = torch.einsum("np,npq,nq->n", c, G, c)
        return (total - 2 * (c * h).sum() + (1 + w) * quad.sum()) / total

    params = [p for g in gates for name, p in g.named_parameters() if name not in ("scale", "weights", "base")]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iters, max_eval=2 * max_iters, history_size=50,
                            tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")
    curve: list[float] = []
    bar = tqdm(total=max_iters, desc="gated regression", disable=not progress, unit="eval")

    best = {"loss": math.inf, "params": [p.detach().clone() for p in params]}

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        value = float(loss.detach())
        curve.append(value)
        if value < best["loss"]:  # NaN never is: a line search that saturates a switch cannot lose the best gates
            best.update(loss=value, params=[p.detach().clone() for p in params])
        bar.update(1)
        return loss

    with torch.enable_grad():
        opt.step(closure)
    bar.close()
    with torch.no_grad():
        for p, b in zip(params, best["params"]):
            p.copy_(b)
        c, theta = coefficients()
        for k, j in enumerate(ci):
            lib.constants[names[j]].copy_(theta[k])
        for gate, col in zip(gates, offsets):
            gate.scale.copy_(theta[col])
            if A:
                gate.weights.copy_(theta[col + 1 : col + 1 + A])
            if hasattr(gate, "base"):
                gate.base.copy_(theta[col + 1 + A])
        final = float(objective())
    settings["regression_loss"] = {"physics": 1.0, "start": curve[0], "final": final, "evaluations": len(curve)}
    rss = (total - 2 * (c * h).sum() + torch.einsum("np,npq,nq->", c, G, c)).clamp_min(0)
    s2 = rss / max(len(q) * system.d - K - len(params), 1)
    se = torch.full((len(names),), math.nan, dtype=G.dtype, device=G.device)
    if ci:
        se[ci] = (s2 * torch.linalg.pinv(G[:, ci][:, :, ci].sum(0), hermitian=True).diagonal()).sqrt()
    return se


def _coefficient_map(model: Hybrid, states: Tensor) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Mean coefficient of each term over ``states`` and its gradient w.r.t. the fitted parameters."""
    lib = model.correction
    if isinstance(lib, HiddenStateLibrary):
        coeffs = lib.coefficients(model.flow)
    elif isinstance(lib, TermLibrary):
        coeffs = lib._coefficients(lib._context(states))
    else:
        return {}, {}
    params = [p for p in model.parameters() if p.requires_grad]
    values, grads = {}, {}
    for name, c in coeffs.items():
        m = c.mean()
        values[name] = float(m.detach())
        g = torch.autograd.grad(m, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, g)])
    return values, grads


def _cluster_meat(J: Tensor, r: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """The sandwich's middle: the windows' scores ``J_w^T r_w`` (trajectory rows only), clustered by window."""
    n_out, B, d = shape
    n = n_out * B * d
    scores = torch.einsum("kbdp,kbd->bp", J[:n].reshape(n_out, B, d, -1), r[:n].reshape(n_out, B, d))
    return scores.T @ scores * (B / max(B - 1, 1))


def _sandwich(J: Tensor, r: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Parameter covariance ``A^-1 M A^-1``: ``A = J^T J``, ``M`` the windows' scores ``J_w^T r_w`` clustered.

    The residuals are deterministic model error correlated along each window, so the spread of
    the per-window estimating equations (a cluster-robust sandwich) is the honest scale.
    """
    meat = _cluster_meat(J, r, shape)
    Ainv = torch.linalg.pinv(J.T @ J, hermitian=True, rtol=1e-13)
    return Ainv @ meat @ Ainv


def _default_step_size(trajectory: Trajectory) -> float:
    """RK4 substep: ``1/n`` steps with ``lr * S / n <= 0.25`` (4 substeps at the edge of stability)."""
    s = trajectory.history.get("sharpness", trajectory.sharpness)
    s = s[torch.isfinite(s)]
    if len(s) == 0:
        return 0.5
    return 1.0 / max(1, math.ceil(trajectory.lr * float(s.max()) / 0.25))


def _check_inputs(model: Hybrid, trajectory: Trajectory, target: str, method: str) -> Trajectory:
    if not isinstance(model, Hybrid):
        raise InputError(
            f"fit: model must be an nf.Hybrid(flow, correction), got {type(model).__name__}; wrap a physics flow "
            "with nf.Hybrid(flow, correction) (or nf.Hybrid(flow, None) for the physics alone)."
        )
    if not isinstance(trajectory, Trajectory):
        raise InputError(f"fit: trajectory must be an nf.Trajectory (from run_gd), got {type(trajectory).__name__}.")
    problem = model.problem
    if trajectory.dim != problem.dim:
        raise InputError(
            f"fit: the trajectory has {trajectory.dim} parameters but the model's problem {problem.name!r} has "
            f"{problem.dim}; fit the trajectory with a model built on the problem that produced it."
        )
    if abs(trajectory.lr - model.lr) > 1e-9 * model.lr:
        raise InputError(
            f"fit: the trajectory was run with lr={trajectory.lr:g} but the model uses lr={model.lr:g}; build the "
            "flow and the correction with the trajectory's lr."
        )
    name = trajectory.problem.get("name")
    if name is not None and name != problem.name:
        raise InputError(
            f"fit: the trajectory comes from problem {name!r} but the model is built on {problem.name!r}."
        )
    _check_first_loss(problem, trajectory)
    if target not in ("iterates", "smoothed"):
        raise InputError(f"fit: target must be 'iterates' or 'smoothed', got {target!r}.")
    if method not in ("adjoint", "direct", "regression"):
        raise InputError(f"fit: method must be 'adjoint', 'direct' or 'regression', got {method!r}.")
    if model.extra_state is not None and method == "regression":
        raise InputError(
            f"fit: method='regression' reads derivatives of theta alone, but the {model.flow.name} flow carries "
            f"{model.extra_state.name}; use method='adjoint' or 'direct'."
        )
    bad = ~torch.isfinite(trajectory.iterates).all(dim=1)
    if bool(bad.any()):
        step = int(trajectory.steps[bad.nonzero()[0, 0]])
        raise InputError(
            f"fit: the trajectory's iterates are not finite from step {step} on; fit the finite part, e.g. "
            f"trajectory.slice(stop={step})."
        )
    trajectory = trajectory.on_grid()  # windows and derivative stencils need evenly spaced iterates
    return trajectory if target == "iterates" else trajectory.smoothed()


def _check_first_loss(problem: Problem, trajectory: Trajectory) -> None:
    """The problem must reproduce the loss the trajectory recorded at its first iterate (same data, same net).

    Skipped where there is nothing to compare: a smoothed trajectory (its loss series is GD's, its
    iterates midpoints) or a recorded loss that is not finite.
    """
    recorded = float(trajectory.loss[0])
    if trajectory.meta.get("smoothed") or not math.isfinite(recorded):
        return
    with torch.no_grad():
        now = float(problem.loss(trajectory.iterates[0].to(device=problem.device, dtype=problem.dtype)))
    rtol = max(1e-9, 1e4 * torch.finfo(problem.dtype).eps)
    if not math.isclose(now, recorded, rel_tol=rtol, abs_tol=1e-300):
        raise InputError(
            f"fit: the model's problem gives loss {now:.12g} at the trajectory's first iterate but the trajectory "
            f"recorded {recorded:.12g}; the trajectory comes from another problem (other data or architecture). "
            "Build the model on the problem that produced the trajectory."
        )


def _check_exclude(exclude: Sequence[Sequence[int | None]] | None) -> list[list[int]]:
    """``exclude`` as a list of ``[start, stop]`` step ranges with ``start < stop`` (None: open end)."""
    ranges = []
    for r in list(exclude) if exclude is not None else []:
        try:
            lo, hi = r
            lo = -(2**62) if lo is None else int(lo)
            hi = 2**62 if hi is None else int(hi)
        except (TypeError, ValueError, OverflowError):
            raise InputError(
                f"fit: exclude must hold (start, stop) step pairs of ints (None for an open end), got {r!r}."
            ) from None
        if not lo < hi:
            raise InputError(f"fit: an excluded range needs start < stop, got ({lo}, {hi}).")
        ranges.append([lo, hi])
    return ranges


def _objective(
    model: Hybrid, trajectory: Trajectory, window: int, target: str, method: str, min_norm: float,
    val_fraction: float, stride: int | None, seed: int, solver: str, step_size: float | None, rtol: float,
    atol: float, exclude: Sequence[tuple[int, int]], settings: dict[str, Any], extra_start: str = "measured",
    variance_weight: float = 0.0,
) -> tuple[_Objective, Trajectory]:
    """Validate the inputs and set up the windows and the loss; records resolved settings."""
    targets = _check_inputs(model, trajectory, target, method)
    settings["exclude"] = exclude = _check_exclude(exclude)
    window = check_positive_int(window, "fit: window")
    settings["stride"] = stride = window if stride is None else check_positive_int(stride, "fit: stride")
    if solver in _FIXED_GRID:
        if step_size is None:
            step_size = _default_step_size(trajectory)
            settings["step_size_used"] = step_size
        options: dict[str, Any] = {"step_size": float(step_size)}
        if not 0 < step_size <= targets.store_every:
            raise InputError(f"fit: step_size must be in (0, {targets.store_every}] steps, got {step_size!r}.")
    elif solver in _ADAPTIVE:
        options = {}
    else:
        raise InputError(f"fit: unknown solver {solver!r}; choose from {sorted(_FIXED_GRID + _ADAPTIVE)}.")
    if not (isinstance(min_norm, (int, float)) and math.isfinite(min_norm) and min_norm >= 0):
        raise InputError(f"fit: min_norm must be a non-negative number, got {min_norm!r}.")
    problem = model.problem
    win = _make_windows(targets, window, stride, val_fraction, seed, problem.dtype, problem.device, exclude)
    if model.correction is not None:
        model.correction.reset_cache()
    if hasattr(model.flow, "reset"):  # warm starts and reference bases from an earlier simulation or fit
        model.flow.reset()
    if extra_start not in ("measured", "fitted"):
        raise InputError(f"fit: extra_start must be 'measured' or 'fitted', got {extra_start!r}.")
    if extra_start == "fitted" and model.extra_state is None:
        raise InputError(f"fit: extra_start='fitted' fits the start of a flow's extra state, but the {model.flow.name} "
                         "flow carries none; leave extra_start='measured'.")
    if extra_start == "fitted" and val_fraction:
        raise InputError("fit: with extra_start='fitted' a validation window's start would have to be fitted on the "
                         "window itself, so it cannot validate; pass val_fraction=0.")
    start = win.targets[0]
    if model.extra_state is not None:  # the measured extra state at each window's first iterate
        extra = torch.stack([model.initial_extra(x, trajectory, int(k)) for x, k in zip(start, win.steps)])
        start = model.join(start, extra)
    variance = _variance_term(model, trajectory, win, variance_weight)
    return _Objective(model, win, method, solver, options, rtol, atol, float(min_norm), start,
                      extra_start == "fitted", variance), targets


def _variance_term(model: Hybrid, trajectory: Trajectory, win: _Windows,
                   weight: float) -> tuple[float, Tensor, Tensor] | None:
    """The loss's variance part: ``(weight, log s_measured, mask)`` at every window output, or None for weight 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise InputError(f"fit: variance_weight must be a non-negative number, got {weight!r}.")
    if weight == 0:
        return None
    if not hasattr(model.flow, "predicted_variance"):
        raise InputError(f"fit: variance_weight compares a flow's predicted oscillation variance with GD's, but the "
                         f"{model.flow.name} flow predicts none; use the oscillation flow or variance_weight=0.")
    log_s, mask = _measured_log_variance(trajectory, win)
    if not bool(mask.any()):
        raise InputError("fit: the trajectory has no measured oscillation variance above its floor in the windows; "
                         "record it with run_gd (n_eigs >= 1) or pass variance_weight=0.")
    return float(weight), log_s, mask


def _measured_log_variance(trajectory: Trajectory, win: _Windows) -> tuple[Tensor, Tensor]:
    """GD's measured ``log s`` at every window output ``(n_out + 1, W)`` and where it counts: finite and at least
    ``(_VARIANCE_FLOOR_RATIO ||m_{k+1} - m_k||)^2`` (the demodulation's floor, :mod:`neuralflow.oscillation`)."""
    osc = trajectory.oscillation
    steps = (win.steps[None, :] + win.t[:, None].round().long()).cpu()
    row = torch.searchsorted(osc.steps, steps.clamp(max=int(osc.steps[-1])))
    found = osc.steps[row] == steps
    s, step = osc.variance[row], osc.smoothed_step[row]
    mask = found & torch.isfinite(s) & torch.isfinite(step) & (s > 0) & (s >= (_VARIANCE_FLOOR_RATIO * step) ** 2)
    log_s = torch.log(torch.where(mask, s, 1.0))
    device, dtype = win.targets.device, win.targets.dtype
    return log_s.to(device=device, dtype=dtype), mask.to(device)


def fit_loss(
    model: Hybrid,
    trajectory: Trajectory,
    window: int = 20,
    target: str = "iterates",
    method: str = "adjoint",
    min_norm: float = 1e-4,
    val_fraction: float = 0.2,
    stride: int | None = None,
    seed: int = 0,
    solver: str = "rk4",
    step_size: float | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    exclude: Sequence[tuple[int, int]] = (),
    variance_weight: float = 0.0,
) -> tuple[float, Tensor]:
    """The loss :func:`fit` minimises at the model's current parameters, and its gradient.

    The gradient is flat over the correction's trainable parameters (``model.parameters()``
    order), by the adjoint method (``method="adjoint"``) or backpropagation (``"direct"``).
    Arguments as in :func:`fit`.
    """
    if method not in ("adjoint", "direct"):
        raise InputError(f"fit_loss: method must be 'adjoint' or 'direct', got {method!r}.")
    obj, _ = _objective(
        model, trajectory, window, target, method, min_norm, val_fraction, stride, seed, solver, step_size, rtol,
        atol, exclude, {}, variance_weight=variance_weight,
    )
    if not obj.params:
        raise InputError("fit_loss: the model has no trainable parameters.")
    return obj.loss_and_grad()


def fit(
    model: Hybrid,
    trajectory: Trajectory | Sequence[Trajectory],
    window: int = 20,
    target: str = "iterates",
    method: str = "adjoint",
    optimizer: str = "auto",
    min_norm: float = 1e-4,
    max_iters: int | None = None,
    val_fraction: float = 0.2,
    stride: int | None = None,
    patience: int = 5,
    tol: float = 1e-9,
    init: str = "auto",
    learning_rate: float = 1e-2,
    seed: int = 0,
    solver: str = "rk4",
    step_size: float | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    progress: bool = True,
    balance: bool = False,
    exclude: Sequence[tuple[int, int]] = (),
    resume: str | os.PathLike | None = None,
    extra_start: str = "measured",
    variance_weight: float = 0.0,
) -> FitResult:
    """Fit ``model`` (a :class:`~neuralflow.corrections.Hybrid`) to ``trajectory`` by multiple shooting.

    Windows of ``window`` steps start every ``stride`` steps (default: ``window``, disjoint) at the
    observed iterates (``target="iterates"``) or at the midpoint process (``"smoothed"``,
    Cohen et al. 2025); a seeded ``val_fraction`` of them is held out for validation and early
    stopping (``patience`` iterations without improvement). The loss is described in
    :mod:`neuralflow.fit`. ``method``: ``"adjoint"`` (``odeint_adjoint``), ``"direct"``
    (backpropagation through ``odeint``) or ``"regression"`` (the derivative-regression baseline,
    no ODE fit; gated coefficients by LBFGS over fields and gate inputs evaluated once at the targets,
    at most ``max_iters`` iterations, default 200; the window errors still come from one final
    batched solve). ``optimizer``: ``"gauss-newton"`` (Levenberg-Marquardt, default for at most 64
    parameters), ``"lbfgs"`` or ``"adam"`` (``learning_rate``). ``init="regression"`` starts a
    term library from the regression baseline (the default for constant coefficients and for
    ``method="regression"``; gates are then re-initialised from ``seed``), ``"current"`` from the
    model's parameters. ``solver`` is a torchdiffeq method; fixed-grid
    ones use ``step_size`` (in steps; default ``1/n`` with ``n`` the smallest integer making
    ``lr * S * step_size <= 0.25`` for the largest sharpness ``S`` the trajectory measured, ``1/2``
    if it measured none), adaptive ones ``rtol`` and ``atol``. ``balance=True`` weights the
    regression's points by the inverse local mean of their squared velocity residual over
    ``window + 1`` points, so that a short transient (a catapult at the edge of stability) cannot
    dominate it. ``exclude`` lists ``(start, stop)`` step ranges (None for an open end): every window
    that meets one, or comes within the regression's 5-point stencil of it, is dropped from training
    and validation (a transient the model is not meant to describe, such as the round-off-seeded
    onset of the edge-of-stability oscillation, ``Trajectory.eos_transients()``).

    A solver failure mid-fit raises :class:`~neuralflow.errors.DivergenceError`; the model then
    holds the best parameters found so far (also in ``error.partial``). Ctrl-C during the optimisation
    raises :class:`~neuralflow.errors.Interrupted` whose ``partial`` is the FitResult of the best
    parameters so far (``settings["interrupted_after"]`` iterations).

    ``resume=path`` (Gauss-Newton only, the default for term libraries): the optimiser's state is
    written atomically to ``path`` after every iteration, and a fit started with an existing ``path``
    continues from it; the fitted numbers are bit for bit those of an uninterrupted fit. The file
    must come from the same settings, model and targets. Runs are reproducible
    bit-for-bit on the same machine.

    ``trajectory`` may be a list of runs (e.g. at several ``lr``): one set of coefficients is then fitted
    to all of them and the result says which terms are universal (:func:`fit_runs`).

    For a flow with extra state (module docstring) each window's extra state starts from the flow's
    ``initial_extra`` at its first step (``extra_start="measured"``: the trajectory's measurement where it has
    one), or is fitted per window from there (``"fitted"``, with ``val_fraction=0``: a validation window's start
    would be fitted on it; these nuisance starts are not returned). ``variance_weight`` adds the measured
    oscillation variance to the loss in log scale (module docstring; 0, the default, leaves it out).
    """
    if isinstance(trajectory, (list, tuple)):  # several runs share one set of coefficients
        options = {k: v for k, v in locals().items() if k not in ("model", "trajectory")}
        return fit_runs(model, trajectory, **options)
    t_begin = time.perf_counter()
    settings = {
        "window": window, "target": target, "method": method, "optimizer": optimizer, "min_norm": min_norm,
        "max_iters": max_iters, "val_fraction": val_fraction, "stride": stride, "patience": patience, "tol": tol,
        "init": init, "learning_rate": learning_rate, "seed": seed, "solver": solver, "step_size": step_size,
        "rtol": rtol, "atol": atol, "balance": bool(balance), "extra_start": extra_start,
        "variance_weight": variance_weight,
        "model": model.config() if isinstance(model, Hybrid) else None,
    }
    patience = check_positive_int(patience, "fit: patience")
    if optimizer not in _OPTIMIZERS:
        raise InputError(f"fit: unknown optimizer {optimizer!r}; choose from {list(_OPTIMIZERS)}.")
    if init not in ("auto", "regression", "current"):
        raise InputError(f"fit: init must be 'auto', 'regression' or 'current', got {init!r}.")
    obj, targets = _objective(
        model, trajectory, window, target, method, min_norm, val_fraction, stride, seed, solver, step_size, rtol,
        atol, exclude, settings, extra_start, variance_weight,
    )
    win, problem, lib = obj.win, model.problem, model.correction
    can_regress = isinstance(lib, TermLibrary) and model.extra_state is None
    if method == "regression" and not can_regress:
        raise InputError(
            "fit: method='regression' needs a TermLibrary (constant or gated coefficients); fit a NeuralCorrection "
            "with method='adjoint' or 'direct'."
        )
    if init == "auto":
        wanted = can_regress and (method == "regression" or not lib.gated)
        init = "regression" if wanted and len(targets) >= 5 else "current"
    if init == "regression" and not can_regress:
        raise InputError("fit: init='regression' needs a TermLibrary on a flow without extra state; use "
                         "init='current'.")
    timing: dict[str, float] = {}
    history: list[dict[str, float]] = []
    regression_se = None
    if init == "regression" or method == "regression":
        t0 = time.perf_counter()
        if lib.gated:
            system = _regression_system(model, targets, win, balance=balance)
            timing["regression_fields"] = time.perf_counter() - t0
            iters = _GATED_REGRESSION_ITERS if max_iters is None else check_positive_int(max_iters, "fit: max_iters")
            regression_se = _gated_regression(lib, system, float(min_norm), iters, init, seed, settings, progress)
        else:
            coef, regression_se = _regression(model, targets, win, balance=balance)
            with torch.no_grad():
                for name, c in zip(lib.terms, coef):
                    lib.constants[name].copy_(c)
        timing["regression"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    interrupted = False
    if method != "regression" and obj.params:
        optimizer, interrupted = _optimise(obj, optimizer, max_iters, patience, tol, learning_rate, history, progress,
                                           resume, settings)
    timing["optimise"] = time.perf_counter() - t0
    n_evals = obj.counted.n

    t0 = time.perf_counter()
    everything = torch.arange(win.targets.shape[1], device=problem.device)
    try:
        final_residuals = obj.residuals(grad=False)
        hybrid_errors, physics_errors = obj.last_errors, obj.physics_errors
        if not history:  # regression, or nothing to fit
            history.append({
                "iteration": 0, "train_loss": float(hybrid_errors[win.train].mean()),
                "val_loss": float(hybrid_errors[win.val].mean()) if len(win.val) else math.nan,
            })
        coefficients, coefficient_grads = _coefficient_map(model, win.targets[0])
        uncertainty = _uncertainty(obj, final_residuals, method, coefficient_grads, regression_se, lib)
    except _SolverFailure as exc:
        raise DivergenceError(
            f"fit: {exc} in the final window solves of the fitted model; the model holds the fitted parameters "
            "(in error.partial too). Check it with a rollout, or try a smaller step_size or solver='rk4'.",
            partial={"model": model, "history": history, "settings": settings},
        ) from None
    shown = win.val if len(win.val) else win.train
    timing["evaluate"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_begin
    settings["optimizer_used"] = optimizer if method != "regression" else None
    settings["init_used"] = init
    if interrupted:
        settings["interrupted_after"] = len(history)
    result = FitResult(
        model=model,
        coefficients=coefficients,
        uncertainty=uncertainty,
        history=history,
        window_errors=hybrid_errors,
        physics_window_errors=physics_errors,
        physics_error=float(physics_errors[shown].mean()),
        hybrid_error=float(hybrid_errors[shown].mean()),
        timing=timing,
        settings=settings,
        trajectory=targets,
        n_function_evals=n_evals,
        windows={"step": win.steps, "validation": torch.isin(everything, win.val)},
        normaliser=win.normaliser,
    )
    if interrupted:
        raise Interrupted(
            f"fit interrupted after {len(history)} iterations; the best fit so far is in this exception's .partial "
            "(a FitResult: save it with .save(path)).",
            partial=result,
        )
    return result


def _uncertainty(
    obj: _Objective, r: Tensor, method: str, grads: dict[str, Tensor], regression_se: Tensor | None, lib: Any
) -> dict[str, float]:
    if method == "regression":
        return {n: float(s) for n, s in zip(lib.terms, regression_se)}
    if not grads or len(obj.get()) > _GN_MAX_PARAMS:
        return {n: math.nan for n in grads}
    J = obj.last_jacobian if obj.last_jacobian is not None else obj.jacobian(obj.get(), r)
    n_out, B = obj.win.targets.shape[0] - 1, len(obj.win.train)
    cov = _sandwich(J, r, (n_out, B, obj.model.problem.dim))
    pad = len(cov) - len(next(iter(grads.values())))  # fitted extra-state starts: no coefficient depends on them
    return {n: float((g2 @ cov @ g2).clamp_min(0).sqrt()) for n, g in grads.items()
            for g2 in [torch.cat([g, g.new_zeros(pad)])]}


def _optimise(
    obj: _Objective, optimizer: str, max_iters: int | None, patience: int, tol: float, learning_rate: float,
    history: list[dict[str, float]], progress: bool, resume: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """Run the optimiser; on return the model holds the best parameters (by validation loss).

    Returns the optimiser used and whether Ctrl-C stopped it (the best parameters are kept then too).
    With ``resume`` the Gauss-Newton state is kept in that file (:class:`_GaussNewtonCheckpoint`).
    """
    n_params = len(obj.get())
    if optimizer == "auto":
        optimizer = "gauss-newton" if n_params <= _GN_MAX_PARAMS else "lbfgs"
    if optimizer == "gauss-newton" and n_params > _GN_MAX_PARAMS:
        raise InputError(
            f"fit: gauss-newton needs one solve per parameter and is limited to {_GN_MAX_PARAMS} parameters; this "
            f"correction has {n_params}. Use optimizer='lbfgs' or 'adam'."
        )
    iters = _DEFAULT_ITERS[optimizer] if max_iters is None else check_positive_int(max_iters, "fit: max_iters")
    t_start = time.perf_counter()
    best = {"score": math.inf, "params": obj.get(), "iteration": 0, "stale": 0}
    bar = tqdm(total=iters, desc=f"fit {optimizer}", disable=not progress, unit="it")

    def record(it: int, train_loss: float, params: Tensor) -> bool:
        """Log one iteration; ``train_loss`` and the validation loss were evaluated at ``params``."""
        val = obj.val_loss
        history.append({
            "iteration": it, "train_loss": train_loss, "val_loss": val, "time": time.perf_counter() - t_start,
            "n_function_evals": obj.counted.n,
        })
        score = val if math.isfinite(val) else train_loss
        if score < best["score"]:
            best.update(score=score, params=params.clone(), iteration=it, stale=0)
        else:
            best["stale"] += 1
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val:.4g}")
        if it:
            bar.update(1)
        return best["stale"] >= patience

    step = _gauss_newton if optimizer == "gauss-newton" else _torch_optimiser
    saver = None
    if resume is not None:
        if optimizer != "gauss-newton":
            raise InputError(f"fit: resume= needs the gauss-newton optimiser, not {optimizer!r}.")
        saver = _GaussNewtonCheckpoint(resume, obj, settings or {}, best, history)
        step = saver.wrap(step)
    interrupted = False
    try:
        step(obj, optimizer, iters, tol, learning_rate, record)
        if saver is not None:
            saver.finish()
    except KeyboardInterrupt:  # keep the best parameters; fit() evaluates them and raises Interrupted
        interrupted = True
    except _SolverFailure as exc:
        obj.set(best["params"])
        bar.close()
        raise DivergenceError(
            f"fit: {exc} after {len(history)} recorded iterations; the model now holds the best parameters so far "
            f"(iteration {best['iteration']}, loss {best['score']:.4g}). Try a smaller step_size, solver='rk4', "
            "a shorter window or a smaller learning_rate.",
            partial={"model": obj.model, "history": history, "iteration": best["iteration"]},
        ) from None
    obj.set(best["params"])
    bar.close()
    return optimizer, interrupted


def _gauss_newton(obj: _Objective, optimizer: str, iters: int, tol: float, learning_rate: float, record,
                  xtol: float = 1e-5, start: dict[str, Any] | None = None, after=None) -> None:
    """Levenberg-Marquardt on the residual vector with finite-difference sensitivities ``J``.

    Each iteration costs ``P + 1`` forward solves (no backward pass): ``J`` by one-sided
    differences, then the step ``(J^T J + mu diag(J^T J)) delta = -J^T r``, accepted if the loss
    decreases. For constant coefficients the residuals are nearly linear in them, so a handful of
    iterations suffice. Stops when the loss decreases by less than ``tol`` relative or the
    parameters move by less than ``xtol`` relative.

    ``start`` (``{"iteration", "params", "mu"}``) continues a run that stopped after that iteration;
    ``after(iteration, params, mu)`` is called after every iteration that does not end the run.
    """
    if start is None:
        p, first, mu = obj.get(), 1, 1e-8
    else:
        p, first, mu = start["params"], start["iteration"] + 1, start["mu"]
        obj.set(p)
    r = obj.residuals(grad=False)
    loss = float(r.square().sum())
    if start is None and record(0, loss, p):
        return
    if start is None and after is not None:
        after(0, p, mu)
    for it in range(first, iters + 1):
        J = obj.jacobian(p, r)
        A, b = J.T @ J, J.T @ r
        D = A.diagonal().clamp_min(1e-12 * float(A.diagonal().max()) + torch.finfo(A.dtype).tiny)
        for _ in range(12):
            delta = torch.linalg.solve(A + mu * torch.diag(D), -b)
            obj.set(p + delta)
            new_r = obj.residuals(grad=False)
            new_loss = float(new_r.square().sum())
            if new_loss <= loss:
                break
            mu *= 10
        else:
            obj.set(p)
            return
        done = loss - new_loss <= tol * loss or float(delta.norm()) <= xtol * (float(p.norm()) + xtol)
        p, loss, r = p + delta, new_loss, new_r
        mu = max(mu / 10, 1e-12)
        if record(it, loss, p) or done:
            return
        if after is not None:
            after(it, p, mu)


_FIT_CHECKPOINT = "fit-checkpoint"


class _GaussNewtonCheckpoint:
    """The Gauss-Newton state of a fit, kept in one file: parameters, damping, iteration, best so far, history.

    Written atomically after every iteration and once more, marked finished, at the end. Loading checks
    that the file belongs to this fit: the same settings (model, window, solver, ...) and the same
    targets (a SHA-256 of the window tensors).
    """

    def __init__(self, path: str | os.PathLike, obj: _Objective, settings: dict[str, Any], best: dict[str, Any],
                 history: list[dict[str, float]]) -> None:
        import hashlib
        import json

        self.path, self.obj, self.best, self.history = Path(path), obj, best, history
        digest = hashlib.sha256(obj.win.targets.detach().cpu().contiguous().numpy().tobytes())
        digest.update(obj.win.steps.cpu().numpy().tobytes())
        self.identity = {"settings": json.loads(json.dumps(settings)), "targets_sha256": digest.hexdigest()}
        self.state: dict[str, Any] | None = None
        if self.path.exists():
            self.state = self._load()

    def _load(self) -> dict[str, Any]:
        from . import _io

        tensors, header = _io.read(self.path, _FIT_CHECKPOINT)
        meta = header["meta"]
        for key, value in self.identity.items():
            if meta[key] != value:
                raise InputError(
                    f"{self.path}: this fit checkpoint belongs to another fit (its {key} differ); pass the same model, "
                    "trajectory and settings, or another resume file."
                )
        current = self.obj.get()
        if any(tensors[k].shape != current.shape or tensors[k].dtype != current.dtype for k in ("params", "best")):
            raise FileFormatError(
                f"{self.path}: the checkpoint's parameters do not fit this model ({len(current)} parameters)."
            )
        self.history[:] = meta["history"]
        self.best.update(score=meta["best_score"], params=tensors["best"].to(current.device),
                         iteration=meta["best_iteration"], stale=meta["stale"])
        return {"iteration": meta["iteration"], "params": tensors["params"].to(current.device), "mu": meta["mu"],
                "finished": meta["finished"]}

    def save(self, iteration: int, params: Tensor, mu: float, finished: bool = False) -> None:
        from . import _io

        meta = {**self.identity, "iteration": iteration, "mu": mu, "finished": finished, "history": self.history,
                "best_score": self.best["score"], "best_iteration": self.best["iteration"],
                "stale": self.best["stale"]}
        _io.write(self.path, _FIT_CHECKPOINT, {"params": params, "best": self.best["params"]}, meta)

    def wrap(self, step):
        """``step`` (Gauss-Newton) started from the saved state, saving after every iteration."""
        def resumed(obj, optimizer, iters, tol, learning_rate, record) -> None:
            if self.state is not None and self.state["finished"]:
                return
            step(obj, optimizer, iters, tol, learning_rate, record, start=self.state,
                 after=lambda it, p, mu: self.save(it, p, mu))
        return resumed

    def finish(self) -> None:
        self.save(self.best["iteration"], self.best["params"], math.nan, finished=True)


def _torch_optimiser(obj: _Objective, optimizer: str, iters: int, tol: float, learning_rate: float, record) -> None:
    """LBFGS (strong Wolfe line search) or Adam on the fit loss."""
    params = obj.params
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    else:
        opt = torch.optim.Adam(params, lr=learning_rate)

    evaluated: dict[str, Any] = {}

    def closure() -> Tensor:
        evaluated["params"] = obj.get()
        loss, grad = obj.loss_and_grad()
        evaluated["loss"] = loss
        offset = 0
        for q in params:
            q.grad = grad[offset : offset + q.numel()].view_as(q).clone()
            offset += q.numel()
        return torch.tensor(loss, dtype=grad.dtype)

    if record(0, float(obj.residuals(grad=False).square().sum()), obj.get()):
        return
    previous = math.inf
    for it in range(1, iters + 1):
        opt.step(closure)  # the last evaluation (Adam: before its update) is what gets recorded
        loss = evaluated["loss"]
        if record(it, loss, evaluated["params"]) or abs(previous - loss) <= tol * abs(loss):
            return
        previous = loss


# ===================================================================================================
# Fit across several runs (issue 16): one set of constant coefficients shared by trajectories at
# different learning rates, each run with its own physics at its own lr.
# ===================================================================================================
_UNIVERSAL_Z = 3.0  # a per-run coefficient further than this many combined errors from the joint one is not universal


@dataclass
class JointFitResult(FitResult):
    """What :func:`fit` found on several runs at once (``nf.fit(model, [traj_a, traj_b, ...])``).

    The inherited fields describe the joint fit: ``coefficients`` and ``uncertainty`` are shared by every
    run (pure numbers: each term carries its own power of its run's ``lr``); ``physics_error`` and
    ``hybrid_error`` are means over the runs; the window arrays, ``trajectory`` and ``normaliser`` are
    those of the first run at the model's ``lr`` (else the first run). ``runs`` holds each run's view of
    the joint fit (its model at its ``lr``, sharing the coefficients), ``per_run`` an independent fit of
    each run with the same settings, and ``universality`` per term: ``universal``, the per-run ``values``
    and ``se``, each run's ``lr`` and truncation ``allowance``, and ``z``, the largest disagreement of two runs
    in combined errors (see :func:`fit_runs`).
    """

    runs: list[FitResult] = field(default_factory=list)
    per_run: list[FitResult] = field(default_factory=list)
    universality: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def universal(self) -> dict[str, bool]:
        """Per term: whether its coefficient is the same at every run's ``lr`` (see :func:`fit_runs`)."""
        return {name: u["universal"] for name, u in self.universality.items()}

    def universality_notes(self) -> list[str]:
        """One sentence per term: universal across the runs or not, with the numbers behind the verdict."""
        lrs = ", ".join(f"{r.trajectory.lr:g}" for r in self.runs)
        notes = []
        for name, u in self.universality.items():
            per_run = ", ".join(f"{v:.4g}" for v in u["values"])
            base = (f"{name} across {len(self.runs)} runs (lr {lrs}): joint {self.coefficients[name]:.4g} +- "
                    f"{self.uncertainty[name]:.2g}, per run {per_run}; two runs disagree by at most {u['z']:.2g} "
                    f"combined errors (per-run error and truncation allowance lr S, up to {max(u['allowance']):.2%})")
            if u["universal"] is None:
                notes.append(f"{base}: no verdict (no per-run fits, or lr S >= 1 in a run, where the series in lr "
                             "does not converge).")
            elif u["universal"]:
                notes.append(f"{base}: universal.")
            else:
                notes.append(f"{base}: NOT universal. Its per-run values depend on lr beyond the truncation of the "
                             "series: the term carries another power of lr, or a term the library lacks leaks into it.")
        return notes

    def report(self, **options: Any) -> Report:
        """The report of the joint fit (for the reference run), with one universality note per term."""
        rep = super().report(**options)
        rep.notes.extend(self.universality_notes())
        return rep

    def save(self, path: str | os.PathLike, report: Report | bool = True) -> Path:
        raise InputError("a joint fit is saved run by run: result.runs[i].save(path) writes run i's view of it.")

    def __repr__(self) -> str:
        verdict = ", ".join(f"{n}: {'universal' if u else 'not universal'}" for n, u in self.universal.items())
        return f"Joint{super().__repr__()[:-1]}; {len(self.runs)} runs; {verdict})"


class _JointObjective:
    """Several runs' objectives over one shared parameter vector: residuals and sensitivities stacked.

    Offers what :func:`_optimise` uses of an :class:`_Objective`. Each run's residuals are normalised by
    its own displacement, then weighted by ``weights`` (see :func:`fit_runs`).
    """

    def __init__(self, objectives: list[_Objective], weights: list[float]) -> None:
        self.objectives = objectives
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
        parts = [a * o.residuals(grad) for o, a in zip(self.objectives, self.scales)]
        self._sizes = [len(p) for p in parts]
        return torch.cat(parts)

    def split(self, r: Tensor) -> list[Tensor]:
        return list(torch.split(r, self._sizes))

    def jacobian(self, base: Tensor, r0: Tensor) -> Tensor:
        parts = [a * o.jacobian(base, r / a) for o, a, r in zip(self.objectives, self.scales, self.split(r0))]
        self.last_jacobian = torch.cat(parts)
        return self.last_jacobian

    def loss_and_grad(self) -> tuple[float, Tensor]:
        parts = [o.loss_and_grad() for o in self.objectives]
        return (sum(a * a * p[0] for a, p in zip(self.scales, parts)),
                sum(a * a * p[1] for a, p in zip(self.scales, parts)))


def _at_lr(model: Hybrid, lr: float, share: bool) -> Hybrid:
    """``model``'s physics and library rebuilt at ``lr``; ``share=True`` ties the coefficients to ``model``'s."""
    from .corrections import CORRECTIONS
    from .flows import FLOWS

    def rebuild(registry: dict[str, Any], part: Any) -> Any:
        cfg = dict(part.config())
        name = cfg.pop("name")
        cfg.pop("lr")
        return registry[name](model.problem, lr, **cfg)

    library = rebuild(CORRECTIONS, model.correction)
    if share:
        library.constants = model.correction.constants
    else:
        with torch.no_grad():
            for name, c in model.correction.constants.items():
                library.constants[name].copy_(c)
    return Hybrid(rebuild(FLOWS, model.flow), library)


def _truncation_allowance(model: Hybrid, trajectory: Trajectory) -> float:
    """``lr S``: the relative size of the modified-equation terms a constant-coefficient library omits.

    A term carrying ``lr^p`` absorbs the omitted ``O(lr^{p+1})`` terms, which are ``lr S`` times smaller
    (``S`` the largest sharpness the run measured, else the sharpness at its first iterate).
    """
    from .autodiff import top_eigenpairs

    s = trajectory.history.get("sharpness", trajectory.sharpness)
    s = s[torch.isfinite(s)]
    if len(s):
        sharpness = float(s.max())
    else:
        theta = trajectory.iterates[0].to(dtype=model.problem.dtype, device=model.problem.device)
        sharpness = float(top_eigenpairs(model.problem, theta, k=1).values[0])
    return trajectory.lr * abs(sharpness)


def fit_runs(
    model: Hybrid, trajectories: Sequence[Trajectory], universal_z: float = _UNIVERSAL_Z, per_run: bool = True,
    **options: Any,
) -> JointFitResult:
    """Fit one set of constant coefficients to several runs; say which terms are universal across them.

    ``nf.fit(model, [traj_a, traj_b, ...], **options)`` lands here. ``model`` is a Hybrid of a physics flow
    and a constant-coefficient :class:`~neuralflow.corrections.TermLibrary`; for each trajectory the flow
    and the library are rebuilt at that run's ``lr`` with the coefficients tied to ``model``'s, so that
    term ``i`` contributes ``c_i lr_run^{p_i} field_i`` in every run: ``c_i`` is a pure number, and a
    law such as the modified equation (``Hg = -1/2`` at every ``lr``) is fitted once. The loss is the sum of
    the runs' losses, each normalised by its own displacement (:mod:`neuralflow.fit`) and weighted by the
    inverse of the error its own fit leaves (feasible generalised least squares: the unexplained part is
    the series' truncation, ``O(lr^{p+1})``, so a run at smaller ``lr`` is described better and counts
    more; measured on the recovery problem, equal weights let the ``lr = 0.04`` run, 6 percent off
    theory, decide ``H2g`` and ``D3gg``). The regression start stacks the runs' weighted regressions; the
    uncertainty is the sandwich with each run's windows as clusters. ``options`` are :func:`fit`'s,
    applied to every run. On return ``model`` holds the joint coefficients.

    Universality: with ``per_run=True`` every run is also fitted alone. Term ``i`` is universal when
    the runs' own values agree with each other within ``universal_z`` combined errors: for every pair of
    runs ``|c^r - c^q| <= z sqrt(v_r + v_q)`` with ``v_r = se_r^2 + (a_r c^r)^2``, where ``a_r = lr_r S_r``
    allows for the series' truncation (the omitted ``O(lr^{p+1})`` terms bias a fitted ``lr^p`` coefficient by that
    relative amount; measured on the 57-parameter recovery problem, ``H2g`` drifts 4.7 percent from
    ``lr = 0.01`` to ``0.04``, where ``lr S = 0.075``). A coefficient whose runs disagree beyond that
    carries a power of ``lr`` other than its term's, or stands in for a missing term. Where a run has
    ``lr S >= 1`` (the edge of stability: ``lr S ~ 2``) the series in ``lr`` does not converge and there is no
    verdict (``universal`` is None), as without per-run fits. (The test compares the
    runs with each other, not with the joint fit: where one coefficient is not universal the joint model is
    wrong, its error grows with the misfit, and other coefficients shift to absorb it.)
    """
    if isinstance(trajectories, Trajectory) or not isinstance(trajectories, Sequence) or not trajectories:
        raise InputError("fit: pass one Trajectory or a non-empty list of them (one per run).")
    if not isinstance(model, Hybrid) or not isinstance(model.correction, TermLibrary) or model.correction.gated:
        raise InputError(
            "fit: several runs share the constant coefficients of a TermLibrary; pass nf.Hybrid(flow, "
            "TermLibrary(problem, lr, terms)) without gated terms (gates depend on each run's state)."
        )
    for i, t in enumerate(trajectories):
        if not isinstance(t, Trajectory):
            raise InputError(f"fit: run {i} is a {type(t).__name__}, not an nf.Trajectory (from run_gd).")
    if not (isinstance(universal_z, (int, float)) and universal_z > 0):
        raise InputError(f"fit: universal_z must be a positive number, got {universal_z!r}.")
    t_begin = time.perf_counter()
    defaults = {k: p.default for k, p in inspect.signature(fit).parameters.items() if k not in ("model", "trajectory")}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InputError(f"fit: unknown options {unknown}.")
    options = {**defaults, **options}
    if options["extra_start"] != "measured":
        raise InputError("fit: a fit to several runs starts the extra state from the measurement only; pass "
                         "extra_start='measured' or fit the runs one by one.")
    settings = {k: v for k, v in options.items() if k != "progress"}
    progress, method, init = options["progress"], options["method"], options["init"]
    keys = ("window", "target", "method", "min_norm", "val_fraction", "stride", "seed", "solver", "step_size",
            "rtol", "atol", "exclude")
    setup = {k: options[k] for k in keys}
    timing: dict[str, float] = {}
    singles = []
    if per_run:
        t0 = time.perf_counter()
        singles = [fit(_at_lr(model, t.lr, share=False), t, **options) for t in trajectories]
        timing["per_run"] = time.perf_counter() - t0
    tiny = torch.finfo(model.problem.dtype).tiny
    inverse = [1 / max(s.hybrid_error, tiny) for s in singles] or [1.0] * len(trajectories)
    weights = [w / sum(inverse) for w in inverse]
    models = [_at_lr(model, t.lr, share=True) for t in trajectories]
    built = [_objective(m, t, **setup, settings={}) for m, t in zip(models, trajectories)]
    objectives, targets = [b[0] for b in built], [b[1] for b in built]
    joint = _JointObjective(objectives, weights)
    lib = model.correction
    history: list[dict[str, float]] = []
    regression_se = None
    if method == "regression" or init in ("auto", "regression"):
        t0 = time.perf_counter()
        systems = [_regression_system(m, tg, o.win, balance=options["balance"])
                   for m, tg, o in zip(models, targets, objectives)]
        stacked = replace(systems[0], **{n: torch.cat([w * getattr(s, n) if n != "steps" else s.steps
                                                       for s, w in zip(systems, weights)])
                                         for n in ("G", "h", "q", "f", "steps")})
        coef, regression_se, _ = _least_squares(stacked)
        with torch.no_grad():
            for name, c in zip(lib.terms, coef):
                lib.constants[name].copy_(c)
        timing["regression"] = time.perf_counter() - t0
    optimizer = options["optimizer"]
    t0 = time.perf_counter()
    if method != "regression":
        optimizer = _optimise(joint, optimizer, options["max_iters"], options["patience"], options["tol"],
                              options["learning_rate"], history, progress)
    timing["optimise"] = time.perf_counter() - t0
    try:
        final = joint.split(joint.residuals(grad=False))
    except _SolverFailure as exc:
        raise DivergenceError(f"fit: {exc} in the final window solves of the joint fit.",
                              partial={"model": model, "history": history}) from None
    coefficients, grads = _coefficient_map(models[0], objectives[0].win.targets[0])
    if method == "regression":
        uncertainty = {n: float(s) for n, s in zip(lib.terms, regression_se)}
    else:
        J = joint.last_jacobian if joint.last_jacobian is not None else joint.jacobian(joint.get(), torch.cat(final))
        Js = torch.split(J, [len(r) for r in final])
        A = sum(Ji.T @ Ji for Ji in Js)
        meat = sum(_cluster_meat(Ji, ri, (o.win.targets.shape[0] - 1, len(o.win.train), model.problem.dim))
                   for Ji, ri, o in zip(Js, final, objectives))
        Ainv = torch.linalg.pinv(A, hermitian=True, rtol=1e-13)
        cov = Ainv @ meat @ Ainv
        uncertainty = {n: float((g @ cov @ g).clamp_min(0).sqrt()) for n, g in grads.items()}
    if not history:
        history.append({"iteration": 0, "train_loss": float(torch.cat(final).square().sum()),
                        "val_loss": joint.val_loss})
    views = []
    for m, o, tg in zip(models, objectives, targets):
        shown = o.win.val if len(o.win.val) else o.win.train
        everything = torch.arange(o.win.targets.shape[1], device=model.problem.device)
        views.append(FitResult(
            model=m, coefficients=dict(coefficients), uncertainty=dict(uncertainty), history=history,
            window_errors=o.last_errors, physics_window_errors=o.physics_errors,
            physics_error=float(o.physics_errors[shown].mean()), hybrid_error=float(o.last_errors[shown].mean()),
            timing=timing, settings={**settings, "joint_runs": len(models)}, trajectory=tg,
            n_function_evals=o.counted.n, normaliser=o.win.normaliser,
            windows={"step": o.win.steps, "validation": torch.isin(everything, o.win.val)},
        ))
    universality = {}
    allowance = [_truncation_allowance(model, t) for t in trajectories]
    for name in lib.terms:
        values = [s.coefficients[name] for s in singles]
        errors = [s.uncertainty[name] for s in singles]
        spread = [(e**2 + (a * v) ** 2) for v, e, a in zip(values, errors, allowance)]
        z = max((abs(values[r] - values[q]) / math.sqrt(spread[r] + spread[q])
                 for r, q in itertools.combinations(range(len(values)), 2)), default=0.0 if singles else math.nan)
        # past lr S = 1 the series in lr does not converge (GD at the edge of stability has lr S ~ 2): no verdict
        judged = bool(singles) and max(allowance) < 1
        universality[name] = {"universal": bool(z <= universal_z) if judged else None, "z": z, "values": values,
                              "se": errors, "lr": [t.lr for t in trajectories], "allowance": allowance}
    timing["total"] = time.perf_counter() - t_begin
    settings.update(optimizer_used=optimizer if method != "regression" else None, universal_z=universal_z,
                    run_weights=weights)
    ref = next((i for i, t in enumerate(trajectories) if abs(t.lr - model.lr) <= 1e-9 * model.lr), 0)
    r = views[ref]
    return JointFitResult(
        model=model if abs(r.trajectory.lr - model.lr) <= 1e-9 * model.lr else r.model,
        coefficients=coefficients, uncertainty=uncertainty, history=history, window_errors=r.window_errors,
        physics_window_errors=r.physics_window_errors,
        physics_error=sum(v.physics_error for v in views) / len(views),
        hybrid_error=sum(v.hybrid_error for v in views) / len(views), timing=timing, settings=settings,
        trajectory=r.trajectory, n_function_evals=sum(v.n_function_evals for v in views), windows=r.windows,
        normaliser=r.normaliser, runs=views, per_run=singles, universality=universality,
    )
