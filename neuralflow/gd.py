"""The experiment: full-batch gradient descent, ``theta_{k+1} = theta_k - lr * grad L(theta_k)``.

Stage 2 of the pipeline. Records iterates, loss, gradient norm, the top Hessian eigenvalues
(sharpness, by warm-started LOBPCG on Hessian-vector products) and the top-eigenvector component
of each update.
"""

from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from ._validate import check_positive_finite
from .autodiff import Curvature, EigenResult, top_eigenpairs, value_and_gradient
from .errors import DivergenceError, InputError
from .problems import Problem, check_lr, check_positive_int
from .trajectory import Trajectory

__all__ = ["run_gd"]


def run_gd(
    problem: Problem,
    lr: float,
    steps: int,
    eig_every: int = 1,
    n_eigs: int = 1,
    store_every: int = 1,
    progress: bool = True,
    eig_tol: float = 5e-3,
    theta0: torch.Tensor | None = None,
    eig_retries: int = 2,
) -> Trajectory:
    """Run ``steps`` steps of full-batch GD on ``problem`` and record the trajectory.

    Sharpness (the top ``n_eigs`` eigenvalues of ``H``) is measured every ``eig_every`` steps
    (``eig_every=0`` never) to relative residual ``eig_tol``, each solve warm-started from the
    previous one. Iterates are kept every ``store_every`` steps (the last step always); scalar
    series are kept at every step in ``Trajectory.history``.

    An eigen-solve that misses ``eig_tol`` is retried up to ``eig_retries`` times from a cold
    start with guard vectors and more iterations (:func:`_measure`); if it still fails, the step's
    sharpness is recorded as NaN, ``history["eig_converged"]`` is False there, and a warning names
    the steps: a value that failed its residual check is never recorded.

    A non-finite loss or iterate stops the run with a :class:`DivergenceError` that names the
    step and the last finite sharpness; ``error.partial`` is the trajectory up to that point.
    """
    lr = check_lr(lr)
    eig_tol = check_positive_finite(eig_tol, "eig_tol")
    if isinstance(eig_retries, bool) or not isinstance(eig_retries, int) or eig_retries < 0:
        raise InputError(f"eig_retries must be a non-negative int, got {eig_retries!r}.")
    steps = check_positive_int(steps, "steps")
    store_every = check_positive_int(store_every, "store_every")
    if isinstance(eig_every, bool) or not isinstance(eig_every, int) or eig_every < 0:
        raise InputError(f"eig_every must be a non-negative int (0 = never), got {eig_every!r}.")
    if isinstance(n_eigs, bool) or not isinstance(n_eigs, int) or not 1 <= n_eigs <= problem.dim:
        raise InputError(f"n_eigs must be an int in [1, {problem.dim}] (the problem's dimension), got {n_eigs!r}.")
    theta = problem.check_theta(problem.theta0 if theta0 is None else theta0, "theta0").detach().clone()
    if theta.dim() != 1:
        raise InputError("theta0 must be a single parameter vector, not a batch.")
    if not bool(torch.isfinite(theta).all()):
        raise InputError("theta0 contains NaN or inf values; pass a finite starting point.")

    n = steps + 1
    dev, dt = theta.device, theta.dtype
    hist = {
        "step": torch.arange(n, device=dev),
        "loss": torch.full((n,), math.nan, dtype=dt, device=dev),
        "grad_norm": torch.full((n,), math.nan, dtype=dt, device=dev),
        "sharpness": torch.full((n, n_eigs), math.nan, dtype=dt, device=dev),
        "update_u": torch.full((n,), math.nan, dtype=dt, device=dev),
        "eig_converged": torch.ones(n, dtype=torch.bool, device=dev),
    }
    stored_steps: list[int] = []
    stored: list[torch.Tensor] = []
    block = None
    u = None
    last_sharpness = math.nan
    gen = torch.Generator(device=dev).manual_seed(0)

    def trajectory(upto: int) -> Trajectory:
        keep = torch.tensor(stored_steps, dtype=torch.long, device=dev)
        h = {k: v[: upto + 1] for k, v in hist.items()}
        return Trajectory(
            lr=lr,
            steps=keep,
            iterates=torch.stack(stored) if stored else theta.new_zeros(0, problem.dim),
            **{k: h[k][keep] for k in ("loss", "grad_norm", "sharpness", "update_u")},
            problem=problem.description,
            history=h,
            meta={"eig_every": eig_every, "n_eigs": n_eigs, "store_every": store_every, "eig_tol": eig_tol,
                  "eig_retries": eig_retries},
        )

    bar = tqdm(range(n), desc=f"GD lr={lr:g}", disable=not progress, unit="step")
    for k in bar:
        measure = eig_every > 0 and k % eig_every == 0
        if measure:
            curv = Curvature(problem, theta)
            value, g = curv.value, curv.grad
        else:
            value, g = value_and_gradient(problem, theta)
        if not (torch.isfinite(value) and torch.isfinite(theta).all() and torch.isfinite(g).all()):
            bar.close()
            _warn_unconverged(hist["eig_converged"][:k], eig_tol)
            partial = trajectory(k - 1) if k > 0 else None
            raise DivergenceError(
                f"GD diverged at step {k} (loss {value.item()}); last finite sharpness "
                f"{last_sharpness:.4g} against 2/lr = {2 / lr:.4g}. Lower lr; the trajectory up to "
                f"step {k - 1} is in this error's .partial.",
                partial=partial,
            )
        if measure:
            eig = _measure(curv, n_eigs, block, eig_tol, eig_retries, gen)
            if eig.converged:
                block, u = eig.block, eig.vectors[0]
                hist["sharpness"][k] = eig.values
                last_sharpness = float(eig.values[0])
            else:  # keep the last converged warm start; no update_u along an unmeasured direction
                hist["eig_converged"][k] = False
                u = None
        hist["loss"][k] = value
        hist["grad_norm"][k] = g.norm()
        if u is not None:
            hist["update_u"][k] = -lr * torch.dot(u, g)
        if k % store_every == 0 or k == steps:
            stored_steps.append(k)
            stored.append(theta.clone())
        if progress and k % 50 == 0:
            bar.set_postfix(loss=f"{value.item():.4g}", sharpness=f"{last_sharpness:.4g}")
        if k < steps:
            theta = theta - lr * g
    _warn_unconverged(hist["eig_converged"], eig_tol)
    return trajectory(steps)


def _measure(
    curv: Curvature, n_eigs: int, block: torch.Tensor | None, tol: float, retries: int, gen: torch.Generator
) -> EigenResult:
    """The top eigenpairs at one step: warm-started, then ``retries`` cold starts with guard vectors, each with
    four times the iterations of the one before; the last result (converged or not) is returned."""
    eig = top_eigenpairs(curv, k=n_eigs, v0=block, tol=tol, generator=gen)
    for attempt in range(1, retries + 1):
        if eig.converged:
            break
        eig = top_eigenpairs(curv, k=n_eigs, tol=tol, max_iters=200 * 4**attempt, guard=n_eigs + 1, generator=gen)
    return eig


def _warn_unconverged(converged: torch.Tensor, tol: float) -> None:
    failed = torch.nonzero(~converged).flatten().tolist()
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
        warnings.warn(
            f"run_gd: the eigen-solve missed eig_tol = {tol:g} at {len(failed)} step(s) ({shown}) even after "
            "retries; their sharpness is recorded as NaN (history['eig_converged'] is False there). Loosen eig_tol "
            "or check the problem's scaling.",
            stacklevel=3,
        )
