"""The experiment: full-batch gradient descent, ``theta_{k+1} = theta_k - lr * grad L(theta_k)``.

Stage 2 of the pipeline. Records iterates, loss, gradient norm, the top Hessian eigenvalues
(sharpness, by warm-started LOBPCG on Hessian-vector products) and the top-eigenvector component
of each update.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .autodiff import Curvature, top_eigenpairs, value_and_gradient
from .errors import DivergenceError, InputError
from .oscillation import OscillationRecorder
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
    noise: float = 0.0,
    noise_seed: int = 0,
) -> Trajectory:
    """Run ``steps`` steps of full-batch GD on ``problem`` and record the trajectory.

    Sharpness (the top ``n_eigs`` eigenvalues of ``H``) is measured every ``eig_every`` steps
    (``eig_every=0`` never) to relative residual ``eig_tol``, each solve warm-started from the
    previous one. Iterates are kept every ``store_every`` steps (the last step always); scalar
    series are kept at every step in ``Trajectory.history``.

    ``noise = nu > 0`` adds Gaussian noise of standard deviation ``nu`` per coordinate after each step,
    ``theta_{k+1} = theta_k - lr g_k + nu xi_k``, drawn from its own generator seeded with ``noise_seed`` on
    the problem's device (same seed, same run); it seeds the edge-of-stability oscillation at a known
    level (science.md 7). ``noise = 0`` leaves GD exactly as without it. Both are in ``meta``.

    The period-two oscillation is measured at every step along the tracked eigenvectors (the series
    ``oscillation``, ``oscillation_total`` and ``smoothed_step`` of ``history``; see
    :attr:`Trajectory.oscillation`).

    A non-finite loss or iterate stops the run with a :class:`DivergenceError` that names the
    step and the last finite sharpness; ``error.partial`` is the trajectory up to that point.
    """
    lr = check_lr(lr)
    steps = check_positive_int(steps, "steps")
    store_every = check_positive_int(store_every, "store_every")
    if isinstance(eig_every, bool) or not isinstance(eig_every, int) or eig_every < 0:
        raise InputError(f"eig_every must be a non-negative int (0 = never), got {eig_every!r}.")
    if isinstance(n_eigs, bool) or not isinstance(n_eigs, int) or not 1 <= n_eigs <= problem.dim:
        raise InputError(f"n_eigs must be an int in [1, {problem.dim}] (the problem's dimension), got {n_eigs!r}.")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"noise must be a finite non-negative standard deviation, got {noise!r}.")
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
        raise InputError(f"noise_seed must be an int, got {noise_seed!r}.")
    theta = problem.check_theta(problem.theta0 if theta0 is None else theta0, "theta0").detach().clone()
    if theta.dim() != 1:
        raise InputError("theta0 must be a single parameter vector, not a batch.")

    n = steps + 1
    dev, dt = theta.device, theta.dtype
    hist = {
        "step": torch.arange(n, device=dev),
        "loss": torch.full((n,), math.nan, dtype=dt, device=dev),
        "grad_norm": torch.full((n,), math.nan, dtype=dt, device=dev),
        "sharpness": torch.full((n, n_eigs), math.nan, dtype=dt, device=dev),
        "update_u": torch.full((n,), math.nan, dtype=dt, device=dev),
    }
    stored_steps: list[int] = []
    stored: list[torch.Tensor] = []
    block = None
    u = U = None
    last_sharpness = math.nan
    gen = torch.Generator(device=dev).manual_seed(0)
    noise_gen = torch.Generator(device=dev).manual_seed(noise_seed) if noise > 0 else None
    recorder = OscillationRecorder(n, n_eigs, dt, dev)

    def trajectory(upto: int) -> Trajectory:
        keep = torch.tensor(stored_steps, dtype=torch.long, device=dev)
        h = {k: v[: upto + 1] for k, v in {**hist, **recorder.series}.items()}
        return Trajectory(
            lr=lr,
            steps=keep,
            iterates=torch.stack(stored) if stored else theta.new_zeros(0, problem.dim),
            **{k: h[k][keep] for k in ("loss", "grad_norm", "sharpness", "update_u")},
            problem=problem.description,
            history=h,
            meta={"eig_every": eig_every, "n_eigs": n_eigs, "store_every": store_every, "eig_tol": eig_tol,
                  "noise": float(noise), "noise_seed": noise_seed},
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
            partial = trajectory(k - 1) if k > 0 else None
            raise DivergenceError(
                f"GD diverged at step {k} (loss {value.item()}); last finite sharpness "
                f"{last_sharpness:.4g} against 2/lr = {2 / lr:.4g}. Lower lr; the trajectory up to "
                f"step {k - 1} is in this error's .partial.",
                partial=partial,
            )
        if measure:
            eig = top_eigenpairs(curv, k=n_eigs, v0=block, tol=eig_tol, generator=gen)
            block, u, U = eig.block, eig.vectors[0], eig.vectors
            hist["sharpness"][k] = eig.values
            last_sharpness = float(eig.values[0])
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
            step = -lr * g
            if noise_gen is not None:
                step = step + noise * torch.randn(theta.shape, dtype=dt, device=dev, generator=noise_gen)
            new = theta + step
            recorder.update(k, new - theta, U)
            theta = new
    return trajectory(steps)
