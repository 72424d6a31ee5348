"""The fit's entry points: :func:`fit`, :func:`fit_loss` and :func:`fit_runs`."""

from __future__ import annotations

import inspect
import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..corrections import Hybrid, TermLibrary
from ..errors import DivergenceError, InputError, Interrupted
from ..problems import check_positive_int
from ..trajectory import Trajectory
from .joint import _UNIVERSAL_Z, _at_lr, _JointObjective, _truncation_allowance
from .optimisers import _optimise
from .options import _GATED_REGRESSION_ITERS, _OPTIMIZERS, ShootingOptions
from .regression import _gated_regression, _least_squares, _regression, _regression_system
from .result import FitResult, JointFitResult
from .shooting import SolverFailure, _objective
from .uncertainty import _cluster_meat, _coefficient_map, _uncertainty


def fit_loss(
    model: Hybrid,
    trajectory: Trajectory,
    *,
    window: int = 20,
    target: str = "iterates",
    method: str = "adjoint",
    min_norm: float = 1e-4,
    val_fraction: float = 0.2,
    stride: int | None = None,
    seed: int = 0,
    solver: str | None = None,
    step_size: float | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    exclude: Sequence[tuple[int, int]] = (),
    variance_weight: float = 0.0,
) -> tuple[float, Tensor]:
    """The loss :func:`fit` minimises at the model's current parameters, and its gradient.

    Parameters
    ----------
    model, trajectory, window, target, min_norm, val_fraction, stride, seed
        As in :func:`fit`.
    solver, step_size, rtol, atol, exclude, variance_weight
        As in :func:`fit`.
    method : {"adjoint", "direct"}, default "adjoint"
        The gradient by the adjoint method or by backpropagation through the solver.

    Returns
    -------
    (float, Tensor)
        The loss and its gradient, flat over the correction's trainable parameters (``model.parameters()``
        order).
    """
    if method not in ("adjoint", "direct"):
        raise InputError(f"fit_loss: method must be 'adjoint' or 'direct', got {method!r}.")
    options = ShootingOptions.pick(locals())
    obj, _ = _objective(model, trajectory, options, {})
    if not obj.params:
        raise InputError("fit_loss: the model has no trainable parameters.")
    return obj.loss_and_grad()


def _window_record(win: Any, everything: Tensor, start_extra: Tensor | None) -> dict[str, Tensor]:
    """``FitResult.windows``: each window's start ``step``, whether it is a ``validation`` window and, with
    ``extra_start="fitted"``, its fitted extra-state start ``extra_start`` ``(W, extra size)``."""
    record = {"step": win.steps, "validation": torch.isin(everything, win.val)}
    if start_extra is not None:
        record["extra_start"] = start_extra.detach().clone()
    return record


def fit(
    model: Hybrid,
    trajectory: Trajectory | Sequence[Trajectory],
    *,
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
    solver: str | None = None,
    step_size: float | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    progress: bool = False,
    balance: bool = False,
    exclude: Sequence[tuple[int, int]] = (),
    resume: str | os.PathLike | None = None,
    extra_start: str = "measured",
    variance_weight: float = 0.0,
) -> FitResult:
    """Fit ``model`` (a :class:`~neuralflow.corrections.Hybrid`) to ``trajectory`` by multiple shooting.

    Windows of ``window`` steps start every ``stride`` steps at the observed iterates or at the midpoint process
    (Cohen et al. 2025); a seeded ``val_fraction`` of them is held out for validation and early stopping. Each
    window is integrated with torchdiffeq from its first target state; the loss (:mod:`neuralflow.fit`) is the
    windows' normalised squared distance to the targets, plus the APHYNITY penalty on the correction's size and,
    for a flow with an oscillation state, the measured variance in log scale. Runs are reproducible bit for bit
    on the same machine.

    Parameters
    ----------
    model : Hybrid
        The physics flow plus the correction to fit; on return it holds the best parameters found.
    trajectory : Trajectory or list of Trajectory
        The GD run (:func:`~neuralflow.gd.run_gd`); a list of runs (e.g. at several ``lr``) fits one set of
        coefficients to all of them and says which terms are universal (:func:`fit_runs`).
    window : int, default 20
        Steps per shooting window.
    target : {"iterates", "smoothed"}, default "iterates"
        Fit the observed iterates or the midpoint process ``(theta_{k-1} + 2 theta_k + theta_{k+1}) / 4``.
    method : {"adjoint", "direct", "regression"}, default "adjoint"
        Gradients by ``odeint_adjoint``, by backpropagation through ``odeint``, or no ODE fit: the
        derivative-regression baseline (gated coefficients by LBFGS over fields and gate inputs evaluated once at
        the targets, at most ``max_iters`` iterations, default 200; the window errors still come from one final
        batched solve).
    optimizer : {"auto", "gauss-newton", "lbfgs", "adam"}, default "auto"
        Gauss-Newton / Levenberg-Marquardt with finite-difference sensitivities (the default for at most 64
        parameters), LBFGS or Adam (``learning_rate``).
    min_norm : float, default 1e-4
        Weight of the APHYNITY penalty on the correction's size relative to the physics field.
    max_iters : int, optional
        Optimiser iterations; None: 20 for Gauss-Newton, 100 for LBFGS, 500 for Adam.
    val_fraction : float, default 0.2
        Share of the windows held out for validation (they pick the returned parameters).
    stride : int, optional
        Steps between window starts; None: ``window`` (disjoint windows).
    patience : int, default 5
        Iterations without a better validation loss before the fit stops.
    tol : float, default 1e-9
        Relative decrease of the loss below which the optimiser stops.
    init : {"auto", "regression", "current"}, default "auto"
        Start a term library from the regression baseline (the default for constant coefficients and for
        ``method="regression"``; gates are then re-initialised from ``seed``) or from the model's parameters.
    learning_rate : float, default 1e-2
        Adam's learning rate.
    seed : int, default 0
        Seed of the validation split and of re-initialised gates.
    solver : str, optional
        A torchdiffeq method (:data:`neuralflow.solvers.FIXED_GRID` or :data:`~neuralflow.solvers.ADAPTIVE`); None:
        the physics flow's own choice where it has one (``flow.solver``: explicit Euler in half steps for the central
        and the oscillation flows, whose physics is calibrated on it), else ``"rk4"``.
    step_size : float, optional
        A fixed-grid solver's step in steps; None: the flow's own step with its own solver, else ``1/n`` with ``n``
        the smallest integer making ``lr * S * step_size <= 0.25`` for the largest sharpness the trajectory
        measured (``1/2`` without one).
    rtol, atol : float, default 1e-7, 1e-9
        An adaptive solver's tolerances.
    progress : bool, default False
        Show the optimiser's tqdm bar (the command line and the demo do).
    balance : bool, default False
        Weight the regression's points by the inverse local mean of their squared velocity residual over
        ``window + 1`` points, so that a short transient (a catapult) cannot dominate it.
    exclude : sequence of (start, stop), default ()
        Step ranges (None for an open end) whose windows are dropped from training and validation, e.g. the
        noise-seeded onset of the oscillation (``Trajectory.eos_transients()``).
    resume : path, optional
        Gauss-Newton only: the optimiser's state is written atomically there after every iteration, and a fit
        started with an existing file continues from it, bit for bit (same settings, model and targets).
    extra_start : {"measured", "fitted"}, default "measured"
        For a flow with extra state: each window's extra state starts from the flow's ``initial_extra`` at its
        first step (the trajectory's measurement where it has one), or is fitted per window from there (with
        ``val_fraction=0``; these nuisance starts are returned in ``FitResult.windows["extra_start"]``, and the
        report integrates the windows from them).
    variance_weight : float, default 0.0
        Weight of the measured oscillation variance in the loss, in log scale (:mod:`neuralflow.fit`); 0 leaves
        it out.

    Returns
    -------
    FitResult
        The fitted coefficients and their uncertainty, the physics' and the hybrid's window errors, the history,
        the settings; ``.report()`` explains it, ``.save(path)`` keeps it (a :class:`JointFitResult` for a list
        of runs).

    Raises
    ------
    InputError
        For a bad argument or data that do not match the model (the message says what to do).
    DivergenceError
        When a solve fails mid-fit; the model then holds the best parameters found so far (also in
        ``error.partial``).
    Interrupted
        On Ctrl-C; ``partial`` is the FitResult of the best parameters so far (``settings["interrupted_after"]``).
    """
    if isinstance(trajectory, (list, tuple)):  # several runs share one set of coefficients
        options = {k: v for k, v in locals().items() if k not in ("model", "trajectory")}
        return fit_runs(model, trajectory, **options)
    if not isinstance(trajectory, Trajectory):
        raise InputError(
            f"fit: trajectory must be an nf.Trajectory (from run_gd) or a list of them, got "
            f"{type(trajectory).__name__}."
        )
    t_begin = time.perf_counter()
    settings = {
        "window": window,
        "target": target,
        "method": method,
        "optimizer": optimizer,
        "min_norm": min_norm,
        "max_iters": max_iters,
        "val_fraction": val_fraction,
        "stride": stride,
        "patience": patience,
        "tol": tol,
        "init": init,
        "learning_rate": learning_rate,
        "seed": seed,
        "solver": solver,
        "step_size": step_size,
        "rtol": rtol,
        "atol": atol,
        "balance": bool(balance),
        "extra_start": extra_start,
        "variance_weight": variance_weight,
        "model": model.config() if isinstance(model, Hybrid) else None,
    }
    patience = check_positive_int(patience, "fit: patience")
    if optimizer not in _OPTIMIZERS:
        raise InputError(f"fit: unknown optimizer {optimizer!r}; choose from {list(_OPTIMIZERS)}.")
    if init not in ("auto", "regression", "current"):
        raise InputError(f"fit: init must be 'auto', 'regression' or 'current', got {init!r}.")
    shooting = ShootingOptions.pick(locals())
    obj, targets = _objective(model, trajectory, shooting, settings)
    win, problem, lib = obj.win, model.problem, model.correction
    regressed = lib if isinstance(lib, TermLibrary) and model.extra_state is None else None  # what a regression fits
    if method == "regression" and regressed is None:
        raise InputError(
            "fit: method='regression' needs a TermLibrary (constant or gated coefficients); fit a NeuralCorrection "
            "with method='adjoint' or 'direct'."
        )
    if init == "auto":
        wanted = regressed is not None and (method == "regression" or not regressed.gated)
        init = "regression" if wanted and len(targets) >= 5 else "current"
    if init == "regression" and regressed is None:
        raise InputError(
            "fit: init='regression' needs a TermLibrary on a flow without extra state; use init='current'."
        )
    timing: dict[str, float] = {}
    history: list[dict[str, float]] = []
    regression_se = None
    if regressed is not None and (init == "regression" or method == "regression"):
        t0 = time.perf_counter()
        if regressed.gated:
            system = _regression_system(model, targets, win, balance=balance)
            timing["regression_fields"] = time.perf_counter() - t0
            iters = _GATED_REGRESSION_ITERS if max_iters is None else check_positive_int(max_iters, "fit: max_iters")
            regression_se = _gated_regression(regressed, system, float(min_norm), iters, init, seed, settings, progress)
        else:
            coef, regression_se = _regression(model, targets, win, balance=balance)
            with torch.no_grad():
                for name, c in zip(regressed.terms, coef, strict=True):
                    regressed.constants[name].copy_(c)
        timing["regression"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    interrupted = False
    if method != "regression" and obj.params:
        optimizer, interrupted = _optimise(
            obj, optimizer, max_iters, patience, tol, learning_rate, history, progress, resume, settings
        )
    timing["optimise"] = time.perf_counter() - t0
    n_evals = obj.counted.n

    t0 = time.perf_counter()
    everything = torch.arange(win.targets.shape[1], device=problem.device)
    try:
        final_residuals = obj.residuals(grad=False)
        hybrid_errors, physics_errors = obj.last_errors, obj.physics_errors
        assert hybrid_errors is not None  # residuals() sets them
        if not history:  # regression, or nothing to fit
            history.append(
                {
                    "iteration": 0,
                    "train_loss": float(hybrid_errors[win.train].mean()),
                    "val_loss": float(hybrid_errors[win.val].mean()) if len(win.val) else math.nan,
                }
            )
        coefficients, coefficient_grads = _coefficient_map(model, win.targets[0])
        uncertainty = _uncertainty(obj, final_residuals, method, coefficient_grads, regression_se, lib)
    except SolverFailure as exc:
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
        windows=_window_record(win, everything, obj.start_extra),
        normaliser=win.normaliser,
    )
    if interrupted:
        raise Interrupted(
            f"fit interrupted after {len(history)} iterations; the best fit so far is in this exception's .partial "
            "(a FitResult: save it with .save(path)).",
            partial=result,
        )
    return result


def fit_runs(
    model: Hybrid,
    trajectories: Sequence[Trajectory],
    *,
    universal_z: float = _UNIVERSAL_Z,
    per_run: bool = True,
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

    Parameters
    ----------
    model : Hybrid
        A physics flow with a constant-coefficient term library; on return it holds the joint coefficients.
    trajectories : list of Trajectory
        The runs, one per condition (e.g. ``lr``).
    universal_z : float, default 3.0
        How many combined errors apart two runs' coefficients may be and still count as one universal value.
    per_run : bool, default True
        Also fit every run alone (needed for the universality verdict).
    **options
        :func:`fit`'s options, applied to every run.

    Returns
    -------
    JointFitResult
        The joint fit, each run's own fit and, per term, whether it is universal (None without a verdict).
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
        raise InputError(
            "fit: a fit to several runs starts the extra state from the measurement only; pass "
            "extra_start='measured' or fit the runs one by one."
        )
    settings = {k: v for k, v in options.items() if k != "progress"}
    progress, method, init = options["progress"], options["method"], options["init"]
    setup = ShootingOptions.pick(options)
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
    resolved: list[dict[str, Any]] = [{} for _ in trajectories]  # each run's solver and step, as _objective chose
    built = [_objective(m, t, setup, r) for m, t, r in zip(models, trajectories, resolved, strict=True)]
    objectives, targets = [b[0] for b in built], [b[1] for b in built]
    joint = _JointObjective(objectives, weights)
    lib = model.correction
    history: list[dict[str, float]] = []
    regression_se = None
    if method == "regression" or init in ("auto", "regression"):
        t0 = time.perf_counter()
        systems = [
            _regression_system(m, tg, o.win, balance=options["balance"])
            for m, tg, o in zip(models, targets, objectives, strict=True)
        ]

        def weighted(name: str) -> Tensor:
            return torch.cat([w * getattr(s, name) for s, w in zip(systems, weights, strict=True)])

        stacked = replace(
            systems[0],
            G=weighted("G"),
            h=weighted("h"),
            q=weighted("q"),
            f=weighted("f"),
            steps=torch.cat([s.steps for s in systems]),
        )
        coef, regression_se, _ = _least_squares(stacked)
        with torch.no_grad():
            for name, c in zip(lib.terms, coef, strict=True):
                lib.constants[name].copy_(c)
        timing["regression"] = time.perf_counter() - t0
    optimizer = options["optimizer"]
    t0 = time.perf_counter()
    if method != "regression":
        optimizer = _optimise(
            joint,
            optimizer,
            options["max_iters"],
            options["patience"],
            options["tol"],
            options["learning_rate"],
            history,
            progress,
        )
    timing["optimise"] = time.perf_counter() - t0
    try:
        final = joint.split(joint.residuals(grad=False))
    except SolverFailure as exc:
        raise DivergenceError(
            f"fit: {exc} in the final window solves of the joint fit.", partial={"model": model, "history": history}
        ) from None
    coefficients, grads = _coefficient_map(models[0], objectives[0].win.targets[0])
    if method == "regression":
        assert regression_se is not None  # the regression computed it
        uncertainty = {n: float(s) for n, s in zip(lib.terms, regression_se, strict=True)}
    else:
        J = joint.last_jacobian if joint.last_jacobian is not None else joint.jacobian(joint.get(), torch.cat(final))
        Js = torch.split(J, [len(r) for r in final])
        A = sum(Ji.T @ Ji for Ji in Js)
        meat = sum(
            _cluster_meat(Ji, ri, (o.win.targets.shape[0] - 1, len(o.win.train), model.problem.dim))
            for Ji, ri, o in zip(Js, final, objectives, strict=True)
        )
        Ainv = torch.linalg.pinv(A, hermitian=True, rtol=1e-13)
        cov = Ainv @ meat @ Ainv
        uncertainty = {n: float((g @ cov @ g).clamp_min(0).sqrt()) for n, g in grads.items()}
    if not history:
        history.append(
            {"iteration": 0, "train_loss": float(torch.cat(final).square().sum()), "val_loss": joint.val_loss}
        )
    views = []
    for m, o, tg, chosen in zip(models, objectives, targets, resolved, strict=True):
        shown = o.win.val if len(o.win.val) else o.win.train
        everything = torch.arange(o.win.targets.shape[1], device=model.problem.device)
        assert o.last_errors is not None  # the final joint.residuals() set them
        views.append(
            FitResult(
                model=m,
                coefficients=dict(coefficients),
                uncertainty=dict(uncertainty),
                history=history,
                window_errors=o.last_errors,
                physics_window_errors=o.physics_errors,
                physics_error=float(o.physics_errors[shown].mean()),
                hybrid_error=float(o.last_errors[shown].mean()),
                timing=timing,
                settings={**settings, **chosen, "joint_runs": len(models)},
                trajectory=tg,
                n_function_evals=o.counted.n,
                normaliser=o.win.normaliser,
                windows=_window_record(o.win, everything, None),
            )
        )
    universality = {}
    allowance = [_truncation_allowance(model, t) for t in trajectories]
    for name in lib.terms:
        values = [s.coefficients[name] for s in singles]
        errors = [s.uncertainty[name] for s in singles]
        # without per-run fits (per_run=False) values and errors are empty: no spread, and no verdict below
        spread = [(e**2 + (a * v) ** 2) for v, e, a in zip(values, errors, allowance, strict=False)]
        z = max(
            (
                abs(values[r] - values[q]) / math.sqrt(spread[r] + spread[q])
                for r, q in itertools.combinations(range(len(values)), 2)
            ),
            default=0.0 if singles else math.nan,
        )
        # past lr S = 1 the series in lr does not converge (GD at the edge of stability has lr S ~ 2): no verdict
        judged = bool(singles) and max(allowance) < 1
        universality[name] = {
            "universal": bool(z <= universal_z) if judged else None,
            "z": z,
            "values": values,
            "se": errors,
            "lr": [t.lr for t in trajectories],
            "allowance": allowance,
        }
    timing["total"] = time.perf_counter() - t_begin
    settings.update(
        optimizer_used=optimizer if method != "regression" else None, universal_z=universal_z, run_weights=weights
    )
    ref = next((i for i, t in enumerate(trajectories) if abs(t.lr - model.lr) <= 1e-9 * model.lr), 0)
    r = views[ref]
    return JointFitResult(
        model=model if abs(r.trajectory.lr - model.lr) <= 1e-9 * model.lr else r.model,
        coefficients=coefficients,
        uncertainty=uncertainty,
        history=history,
        window_errors=r.window_errors,
        physics_window_errors=r.physics_window_errors,
        physics_error=sum(v.physics_error for v in views) / len(views),
        hybrid_error=sum(v.hybrid_error for v in views) / len(views),
        timing=timing,
        settings={**settings, **resolved[ref]},
        trajectory=r.trajectory,
        n_function_evals=sum(v.n_function_evals for v in views),
        windows=r.windows,
        normaliser=r.normaliser,
        runs=views,
        per_run=singles,
        universality=universality,
    )
