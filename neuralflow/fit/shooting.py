"""The multiple-shooting objective: window solves, residuals, the loss and its sensitivities."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

from ..corrections import Correction, Hybrid, TermLibrary
from ..errors import InputError
from ..problems import check_positive_int
from ..solvers import ADAPTIVE, FIXED_GRID, Solver
from ..trajectory import Trajectory
from .options import ShootingOptions, _check_exclude, _check_inputs, _default_step_size
from .variance import _variance_term
from .windows import _make_windows, _Windows


class SolverFailure(Exception):
    """A window solve failed (the solver raised, or the state became non-finite): the optimisers treat it as a failed
    evaluation, and :func:`~neuralflow.fit.fit` turns it into a :class:`~neuralflow.errors.DivergenceError`."""


class _Counted(torch.nn.Module):
    """The model, counting right-hand-side evaluations."""

    def __init__(self, model: Hybrid) -> None:
        super().__init__()
        self.model = model
        self.n = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.n += 1
        return self.model(t, y)


class _Optimisable(Protocol):
    """What the optimisers use of an objective: one run's (:class:`_Objective`) or several runs' together."""

    params: list[torch.nn.Parameter]

    @property
    def model(self) -> Hybrid: ...

    @property
    def counted(self) -> Any: ...  # its ``n``: the right-hand-side evaluations so far

    @property
    def val_loss(self) -> float: ...

    def get(self) -> Tensor: ...

    def set(self, vec: Tensor) -> None: ...

    def residuals(self, grad: bool) -> Tensor: ...

    def jacobian(self, base: Tensor, r0: Tensor) -> Tensor: ...

    def loss_and_grad(self) -> tuple[float, Tensor]: ...


class _Objective:
    """Window solves, residuals and the fit loss for one model and one set of windows.

    Every solve integrates all windows (training and validation) as one batch: the right-hand
    side's cost is dominated by per-call overhead on small problems, so the validation error
    comes almost free with each training evaluation.
    """

    def __init__(
        self,
        model: Hybrid,
        win: _Windows,
        method: str,
        solver: Solver,
        min_norm: float,
        start: Tensor,
        fitted_start: bool = False,
        variance: tuple[float, Tensor, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.variance = variance  # (weight, measured log variance (n_out + 1, W), mask) or None
        self._start = start  # (W, state_dim): the windows' first iterates, joined with their extra state
        self.counted = _Counted(model)
        self.win = win
        self.method = method
        self.solver = solver
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = list(self.model_params)
        self.start_extra: torch.nn.Parameter | None = None
        if fitted_start:  # a learnable start of the extra state per window (nuisance parameters, after the model's)
            extra = model.split(start)[1]
            assert extra is not None  # _objective allows fitted_start only for a flow with extra state
            self.start_extra = torch.nn.Parameter(extra.reshape(len(start), -1).clone())
            self.params.append(self.start_extra)
        self.last_jacobian: Tensor | None = None
        self.val_loss = math.nan
        self.last_errors: Tensor | None = None
        physics = Hybrid(model.flow, None)  # on the flow's own state (a latent correction's z left out)
        self.physics_errors = self.errors(self.solve(self.start[:, : physics.state_dim], grad=False, model=physics))
        self.penalty_weight = 0.0
        if model.extra_state is None:
            with torch.no_grad():
                size = float(physics(win.t[0], win.targets[0, win.train]).square().sum(-1).mean())
            # APHYNITY weight relative to the physics' own error, so the bias it puts on a needed
            # correction is ~ min_norm (||F_a|| / ||F_p||)^2 whatever the problem.
            self.penalty_weight = min_norm * float(self.physics_errors[win.train].mean()) / max(size, 1e-300)
        lib = model.correction
        self.batched_sensitivities = (
            isinstance(lib, TermLibrary) and not lib.gated and solver.fixed_grid and len(self.params) == len(lib.terms)
        )

    @property
    def start(self) -> Tensor:
        """The windows' initial ODE states ``(W, state_dim)`` (differentiable in the fitted extra-state starts)."""
        if self.start_extra is None:
            return self._start
        return torch.cat([self._start[:, : self.win.targets.shape[-1]], self.start_extra], dim=1)

    def solve(self, y0: Tensor, grad: bool, model: torch.nn.Module | None = None) -> Tensor:
        """Integrate from the rows of ``y0`` over the window's output times, ``(n_out + 1, B, d)``."""
        func = self.counted if model is None else model
        kw = self.solver.odeint_options()
        try:
            if grad and self.method == "adjoint":
                sol = odeint_adjoint(
                    func,
                    y0,
                    self.win.t,
                    adjoint_params=tuple(self.model_params),
                    adjoint_options={**kw["options"], "norm": "seminorm"},
                    **kw,
                )
            elif grad:
                sol = odeint(func, y0, self.win.t, **kw)
            else:
                with torch.no_grad():
                    sol = odeint(func, y0, self.win.t, **kw)
        except (AssertionError, RuntimeError) as exc:  # torchdiffeq signals "underflow in dt" by assertion
            raise SolverFailure(f"the ODE solver failed ({exc})") from None
        if not torch.isfinite(sol).all():
            raise SolverFailure("the ODE solution became non-finite")
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
            parts.append(self._variance_residuals(sol[1:, idx], idx))
        if fa is not None:
            parts.append(fa.reshape(-1) * math.sqrt(self.penalty_weight / B))
        return torch.cat(parts)

    def _variance_residuals(self, sol: Tensor, idx: Tensor) -> Tensor:
        """``sqrt(w / n) (log s_model - log s_measured)`` at the measured outputs of windows ``idx`` (0 elsewhere, so
        that the residual vector keeps its length); ``sol`` holds those windows' outputs after the first."""
        assert self.variance is not None  # called only with a variance part
        weight, measured, mask = self.variance
        measured, mask = measured[1:, idx], mask[1:, idx]
        flow: Any = self.model.flow  # a flow with predicted_variance (checked when the variance part was set up)
        model = flow.predicted_variance(flow.split(sol)[1])
        gap = torch.log(model.clamp_min(torch.finfo(model.dtype).tiny)) - measured
        n = max(int(mask.sum()), 1)
        return (torch.where(mask, gap, 0.0) * math.sqrt(weight / n)).reshape(-1)

    def _penalised(self) -> Correction | None:
        """The correction when the loss penalises its size (APHYNITY), else None."""
        return self.model.correction if self.penalty_weight > 0 else None

    def residuals(self, grad: bool) -> Tensor:
        """Residual vector at the current parameters; also updates :attr:`val_loss`."""
        sol = self.solve(self.start, grad)
        self.last_errors = self.errors(sol)
        if len(self.win.val):
            self.val_loss = float(self.last_errors[self.win.val].mean())
            if self.variance is not None:  # the loss the fit minimises, on the validation windows
                with torch.no_grad():
                    self.val_loss += float(self._variance_residuals(sol[1:, self.win.val], self.win.val).square().sum())
        fa = None
        penalised = self._penalised()
        if penalised is not None:
            with torch.set_grad_enabled(grad):
                fa = penalised(self.win.t[0], self.win.targets[0, self.win.train])
        return self._residuals(sol, fa)

    def loss_and_grad(self) -> tuple[float, Tensor]:
        loss = self.residuals(grad=True).square().sum()
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads, strict=True)]
        )
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
        self.last_jacobian = torch.stack([(c - r0) / h for c, h in zip(cols, steps, strict=True)], dim=1)
        return self.last_jacobian

    def _batched_differences(self, base: Tensor, steps: Tensor) -> list[Tensor]:
        lib = self.model.correction
        assert isinstance(lib, TermLibrary)  # batched sensitivities are for a constant-coefficient library only
        P = len(base)
        start = self.start
        W = start.shape[0]
        rows = base.expand(P, P) + torch.diag(steps)  # copy j has coefficient j shifted
        with lib.row_constants(rows.repeat_interleave(W, dim=0)):
            sol = self.solve(start.repeat(P, 1), grad=False)
        fa = None
        if self._penalised() is not None:
            starts = self.win.targets[0, self.win.train]
            with lib.row_constants(rows.repeat_interleave(len(starts), dim=0)), torch.no_grad():
                fa = lib(self.win.t[0], starts.repeat(P, 1)).reshape(P, len(starts), -1)
        sol = sol.reshape(sol.shape[0], P, W, -1)
        return [self._residuals(sol[:, j], None if fa is None else fa[j]) for j in range(P)]


def _objective(
    model: Hybrid,
    trajectory: Trajectory,
    options: ShootingOptions,
    settings: dict[str, Any],
) -> tuple[_Objective, Trajectory]:
    """Validate the inputs and set up the windows and the loss; records resolved settings."""
    window, target, method, min_norm = options.window, options.target, options.method, options.min_norm
    val_fraction, stride, seed, solver = options.val_fraction, options.stride, options.seed, options.solver
    step_size, rtol, atol, exclude = options.step_size, options.rtol, options.atol, options.exclude
    extra_start, variance_weight = options.extra_start, options.variance_weight
    targets = _check_inputs(model, trajectory, target, method)
    settings["exclude"] = excluded = _check_exclude(exclude)
    window = check_positive_int(window, "fit: window")
    settings["stride"] = stride = window if stride is None else check_positive_int(stride, "fit: stride")
    fixed_step = None
    if solver is None:  # the flow's own integrator (Euler in half steps for the central and oscillation flows)
        preferred = getattr(model.flow, "solver", None)
        own = Solver.from_options(preferred) if preferred else None
        settings["solver"] = solver = "rk4" if own is None else own.method
        if own is not None and step_size is None and own.step_size is not None:
            settings["step_size_used"] = step_size = own.step_size
    if solver in FIXED_GRID:
        if step_size is None:
            step_size = _default_step_size(trajectory)
            settings["step_size_used"] = step_size
        if not 0 < step_size <= targets.store_every:
            raise InputError(f"fit: step_size must be in (0, {targets.store_every}] steps, got {step_size!r}.")
        fixed_step = float(step_size)
    elif solver not in ADAPTIVE:
        raise InputError(f"fit: unknown solver {solver!r}; choose from {sorted(FIXED_GRID + ADAPTIVE)}.")
    if not (isinstance(min_norm, (int, float)) and math.isfinite(min_norm) and min_norm >= 0):
        raise InputError(f"fit: min_norm must be a non-negative number, got {min_norm!r}.")
    problem = model.problem
    win = _make_windows(targets, window, stride, val_fraction, seed, problem.dtype, problem.device, excluded)
    if model.correction is not None:
        model.correction.reset_cache()
    model.flow.reset()  # warm starts and reference bases from an earlier simulation or fit
    if extra_start not in ("measured", "fitted"):
        raise InputError(f"fit: extra_start must be 'measured' or 'fitted', got {extra_start!r}.")
    if extra_start == "fitted" and model.extra_state is None:
        raise InputError(
            f"fit: extra_start='fitted' fits the start of a flow's extra state, but the {model.flow.name} "
            "flow carries none; leave extra_start='measured'."
        )
    if extra_start == "fitted" and val_fraction:
        raise InputError(
            "fit: with extra_start='fitted' a validation window's start would have to be fitted on the "
            "window itself, so it cannot validate; pass val_fraction=0."
        )
    start = win.targets[0]
    if model.extra_state is not None:  # the measured extra state at each window's first iterate
        extras = []
        for x, k in zip(start, win.steps, strict=True):
            extra = model.initial_extra(x, trajectory, int(k))
            assert extra is not None  # the flow carries extra state
            extras.append(extra)
        start = model.join(start, torch.stack(extras))
    ode = Solver(solver, fixed_step, rtol, atol)
    variance = _variance_term(model, trajectory, win, variance_weight)
    return _Objective(model, win, method, ode, float(min_norm), start, extra_start == "fitted", variance), targets
