"""The experiment: full-batch gradient descent, ``theta_{k+1} = theta_k - lr * grad L(theta_k)``.

Stage 2 of the pipeline. Records iterates, loss, gradient norm, the top Hessian eigenvalues
(sharpness, by warm-started LOBPCG on Hessian-vector products) and the top-eigenvector component
of each update.

A long run can write its state atomically every ``checkpoint_every`` steps to a checkpoint file
(``resume=path``, kind ``"gd-checkpoint"``) and continue from it bit for bit: the iterate, the series
so far, the eigen-solver's warm start, the random generators' states and the oscillation recorder's
last updates are all in the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import _io
from ._validate import check_positive_finite
from .autodiff import Curvature, EigenResult, top_eigenpairs, value_and_gradient
from .errors import DivergenceError, FileFormatError, InputError, Interrupted
from .oscillation import OscillationRecorder
from .problems import Problem, check_lr, check_nonnegative_int, check_positive_int
from .trajectory import Trajectory

__all__ = ["run_gd", "check_noise"]


def check_noise(noise: float) -> float:
    """Validate the injected noise level ``nu`` of :func:`run_gd`: a finite non-negative number (0: none)."""
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"noise must be a finite non-negative standard deviation, got {noise!r}.")
    return float(noise)


def run_gd(
    problem: Problem,
    lr: float,
    steps: int,
    eig_every: int = 1,
    n_eigs: int = 1,
    store_every: int = 1,
    progress: bool = False,
    eig_tol: float = 5e-3,
    theta0: torch.Tensor | None = None,
    eig_retries: int = 2,
    checkpoint_every: int = 0,
    resume: str | os.PathLike | None = None,
    noise: float = 0.0,
    noise_seed: int = 0,
) -> Trajectory:
    """Run ``steps`` steps of full-batch GD on ``problem`` and record the trajectory.

    ``theta_{k+1} = theta_k - lr * grad L(theta_k)`` (plus ``nu xi_k`` with ``noise = nu > 0``). Scalar series are
    kept at every step in ``Trajectory.history``; iterates every ``store_every`` steps (the last step always).
    Sharpness is measured with warm-started LOBPCG on Hessian-vector products, each solve started from the
    previous one. An eigen-solve that misses ``eig_tol`` is retried from a cold start with guard vectors and more
    iterations; if it still fails, the step's sharpness is recorded as NaN, ``history["eig_converged"]`` is False
    there, and a warning names the steps: a value that failed its residual check is never recorded.

    The period-two oscillation is measured at every step along the tracked eigenvectors (the series
    ``oscillation``, ``oscillation_total`` and ``smoothed_step`` of ``history``; see
    :attr:`Trajectory.oscillation`).

    Parameters
    ----------
    problem : Problem
        The loss over one flat parameter vector (:mod:`neuralflow.problems`).
    lr : float
        The step size, positive and finite.
    steps : int
        How many GD steps to take; the trajectory has ``steps + 1`` points.
    eig_every : int, default 1
        Measure the top eigenvalues of ``H`` every this many steps; 0 never.
    n_eigs : int, default 1
        How many of the top Hessian eigenvalues to track, in ``[1, problem.dim]``.
    store_every : int, default 1
        Keep the iterate every this many steps (the last one always).
    progress : bool, default False
        Show a tqdm bar (the command line and the demo do).
    eig_tol : float, default 5e-3
        Relative residual the eigen-solve must reach for a sharpness to be recorded.
    theta0 : Tensor, optional
        The starting point, shape ``(d,)``; the problem's own ``theta0`` if None.
    eig_retries : int, default 2
        Cold restarts of an eigen-solve that misses ``eig_tol``, each with four times the iterations.
    checkpoint_every : int, default 0
        Write the run's state to ``resume`` atomically every this many steps, at the end and on an
        interruption; 0 never. Needs ``resume``.
    resume : str or PathLike, optional
        The run's checkpoint file (kind ``"gd-checkpoint"``): if it exists, the run continues from it (its
        settings must be these), bit for bit as the uninterrupted run.
    noise : float, default 0.0
        ``nu``: the standard deviation of Gaussian noise added per coordinate after each step,
        ``theta_{k+1} = theta_k - lr g_k + nu xi_k``; it seeds the edge-of-stability oscillation at a known level
        (science.md 7). 0 leaves GD exactly as without it.
    noise_seed : int, default 0
        Seed of the noise's own generator on the problem's device (same seed, same run).

    Returns
    -------
    Trajectory
        The recorded run; ``meta`` holds the settings above, ``noise`` and ``noise_seed`` included.

    Raises
    ------
    InputError
        On an invalid setting or starting point, or a ``resume`` file of another run.
    DivergenceError
        When the loss or the iterate turns non-finite; it names the step and the last finite sharpness, and
        ``error.partial`` is the trajectory up to that point.
    Interrupted
        On Ctrl-C (KeyboardInterrupt); ``partial`` is the trajectory so far and ``checkpoint`` the file written
        (with ``resume``).
    FileFormatError
        When the ``resume`` file is damaged or does not fit its settings.

    Examples
    --------
    >>> import neuralflow as nf
    >>> traj = nf.run_gd(nf.problems.quadratic([[1.0, 0.0], [0.0, 10.0]]), lr=0.1, steps=20)
    >>> traj.iterates.shape
    torch.Size([21, 2])
    """
    lr = check_lr(lr)
    eig_tol = check_positive_finite(eig_tol, "eig_tol")
    check_nonnegative_int(eig_retries, "eig_retries")
    steps = check_positive_int(steps, "steps")
    store_every = check_positive_int(store_every, "store_every")
    check_nonnegative_int(eig_every, "eig_every", "never")
    if isinstance(n_eigs, bool) or not isinstance(n_eigs, int) or not 1 <= n_eigs <= problem.dim:
        raise InputError(f"n_eigs must be an int in [1, {problem.dim}] (the problem's dimension), got {n_eigs!r}.")
    check_nonnegative_int(checkpoint_every, "checkpoint_every", "never")
    noise = check_noise(noise)
    check_nonnegative_int(noise_seed, "noise_seed")
    if checkpoint_every and resume is None:
        raise InputError("checkpoint_every needs the checkpoint file: pass resume=path (it need not exist yet).")
    theta = problem.check_theta(problem.theta0 if theta0 is None else theta0, "theta0").detach().clone()
    if theta.dim() != 1:
        raise InputError("theta0 must be a single parameter vector, not a batch.")
    if not bool(torch.isfinite(theta).all()):
        raise InputError("theta0 contains NaN or inf values; pass a finite starting point.")

    settings = {
        "lr": lr,
        "problem": problem.description,
        "steps": steps,
        "eig_every": eig_every,
        "n_eigs": n_eigs,
        "store_every": store_every,
        "eig_tol": eig_tol,
        "eig_retries": eig_retries,
        "noise": float(noise),
        "noise_seed": noise_seed,
    }
    run = _Run.start(theta, steps, n_eigs, store_every, noise, noise_seed)
    if resume is not None and Path(resume).exists():
        run = _Run.load(resume, settings, theta, problem)
    n = steps + 1

    def trajectory(upto: int) -> Trajectory:
        dev = theta.device
        keep = torch.tensor(run.stored_steps, dtype=torch.long, device=dev)
        h = {k: v[: upto + 1] for k, v in run.hist.items()}
        return Trajectory(
            lr=lr,
            steps=keep,
            iterates=run.stored[: len(run.stored_steps)],
            **{k: h[k][keep] for k in ("loss", "grad_norm", "sharpness", "update_u")},
            problem=problem.description,
            history=h,
            meta={k: v for k, v in settings.items() if k not in ("lr", "problem", "steps")},
        )

    bar = tqdm(range(run.step, n), desc=f"GD lr={lr:g}", disable=not progress, unit="step", initial=run.step, total=n)
    run.mark(run.step)
    try:
        for k in bar:
            run.mark(k)
            if resume is not None and checkpoint_every and k > run.resumed_at and k % checkpoint_every == 0:
                run.save(resume, settings)
            take_step(
                problem,
                run,
                k,
                lr,
                steps,
                eig_every,
                n_eigs,
                eig_tol,
                eig_retries,
                store_every,
                noise,
                bar,
                progress,
                trajectory,
            )
    except KeyboardInterrupt:
        bar.close()
        run.rewind()
        if resume is not None:
            run.save(resume, settings)
        raise Interrupted(
            f"GD interrupted at step {run.step}"
            + (f"; its state is in {resume} (run again with resume= to continue)." if resume is not None else ".")
            + " The trajectory so far is in this exception's .partial.",
            partial=trajectory(run.step - 1) if run.step > 0 else None,
            checkpoint=None if resume is None else Path(resume),
        ) from None
    run.mark(n)
    if resume is not None and checkpoint_every:
        run.save(resume, settings)
    _warn_unconverged(run.hist["eig_converged"], eig_tol)
    return trajectory(steps)


def take_step(
    problem: Problem,
    run: _Run,
    k: int,
    lr: float,
    steps: int,
    eig_every: int,
    n_eigs: int,
    eig_tol: float,
    eig_retries: int,
    store_every: int,
    noise: float,
    bar: Any,
    progress: bool,
    trajectory: Any,
) -> None:
    """GD step ``k``: measure at ``theta_k``, record, store, then move to ``theta_{k+1}``."""
    hist, theta = run.hist, run.theta
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
            f"{run.last_sharpness:.4g} against 2/lr = {2 / lr:.4g}. Lower lr; the trajectory up to "
            f"step {k - 1} is in this error's .partial.",
            partial=partial,
        )
    if measure:
        eig = _measure(curv, n_eigs, run.block, eig_tol, eig_retries, run.gen)
        if eig.converged:
            run.block, run.U = eig.block, eig.vectors
            hist["sharpness"][k] = eig.values
            run.last_sharpness = float(eig.values[0])
        else:  # keep the last converged warm start; nothing recorded along unmeasured directions
            hist["eig_converged"][k] = False
            run.U = None
    hist["loss"][k] = value
    hist["grad_norm"][k] = g.norm()
    if run.U is not None:
        hist["update_u"][k] = -lr * torch.dot(run.U[0], g)
    if k % store_every == 0 or k == steps:
        run.stored[len(run.stored_steps)] = theta
        run.stored_steps.append(k)
    if progress and k % 50 == 0:
        bar.set_postfix(loss=f"{value.item():.4g}", sharpness=f"{run.last_sharpness:.4g}")
    if k < steps:
        new = theta - lr * g
        if run.noise_gen is not None:
            new = new + noise * torch.randn(
                theta.shape, dtype=theta.dtype, device=theta.device, generator=run.noise_gen
            )
        run.recorder.update(k, new - theta, run.U)
        run.theta = new


_CHECKPOINT = "gd-checkpoint"
_HIST_FILL = {
    "loss": math.nan,
    "grad_norm": math.nan,
    "sharpness": math.nan,
    "update_u": math.nan,
    "eig_converged": True,
}


@dataclass
class _Run:
    """Everything a GD run carries from one step to the next, and a copy of it taken at the start of a step."""

    step: int
    theta: torch.Tensor
    hist: dict[str, torch.Tensor]
    stored_steps: list[int]
    stored: torch.Tensor  # preallocated (stored iterates, d): stacking a list at the end would hold them twice
    gen: torch.Generator
    noise_gen: torch.Generator | None
    recorder: OscillationRecorder
    block: torch.Tensor | None = None
    U: torch.Tensor | None = None  # the tracked eigenvectors (rows), the first the top one
    last_sharpness: float = math.nan
    resumed_at: int = 0
    _mark: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls, theta: torch.Tensor, steps: int, n_eigs: int, store_every: int, noise: float, noise_seed: int
    ) -> _Run:
        n, dev, dt = steps + 1, theta.device, theta.dtype
        hist = {"step": torch.arange(n, device=dev)}
        for name, fill in _HIST_FILL.items():
            shape = (n, n_eigs) if name == "sharpness" else (n,)
            hist[name] = torch.full(shape, fill, dtype=torch.bool if name == "eig_converged" else dt, device=dev)
        recorder = OscillationRecorder(n, n_eigs, dt, dev)
        hist.update(recorder.series)  # the same tensors: the recorder fills them, checkpoints carry them
        stored = theta.new_empty(len(range(0, n, store_every)) + (steps % store_every != 0), theta.shape[0])
        noise_gen = torch.Generator(device=dev).manual_seed(noise_seed) if noise > 0 else None
        return cls(0, theta, hist, [], stored, torch.Generator(device=dev).manual_seed(0), noise_gen, recorder)

    def mark(self, step: int) -> None:
        """Remember the state at the start of ``step`` (what an interruption rewinds to, what a checkpoint holds)."""
        self._mark = {
            "step": step,
            "theta": self.theta,
            "stored": len(self.stored_steps),
            "block": self.block,
            "U": self.U,
            "gen": self.gen.get_state(),
            "last_sharpness": self.last_sharpness,
            "noise_gen": None if self.noise_gen is None else self.noise_gen.get_state(),
            "recorder": self.recorder.snapshot(),
        }
        self.step = step

    def rewind(self) -> None:
        """Back to the start of the marked step: its half-written rows are cleared, its stored iterate dropped."""
        m = self._mark
        self.step = m["step"]
        self.theta, self.block, self.U, self.last_sharpness = m["theta"], m["block"], m["U"], m["last_sharpness"]
        self.gen.set_state(m["gen"])
        if self.noise_gen is not None:
            self.noise_gen.set_state(m["noise_gen"])
        self.recorder.restore(m["recorder"])
        self.recorder.clear(self.step)
        del self.stored_steps[m["stored"] :]
        if self.step < self.hist["step"].shape[0]:
            for name, fill in _HIST_FILL.items():
                self.hist[name][self.step] = fill

    def save(self, path: str | os.PathLike, settings: dict[str, Any]) -> None:
        """Write the state at the start of the marked step (:meth:`mark`) atomically to ``path``."""
        m = self._mark
        tensors = {f"history.{k}": v for k, v in self.hist.items()}
        tensors.update(
            theta=m["theta"],
            generator=m["gen"],
            stored_steps=torch.tensor(self.stored_steps[: m["stored"]], dtype=torch.long),
            stored=self.stored[: m["stored"]],
        )
        tensors.update({f"recorder.{k}": v for k, v in OscillationRecorder.to_tensors(m["recorder"]).items()})
        for name in ("block", "U", "noise_gen"):
            if m[name] is not None:
                tensors[name] = m[name]
        meta = {**settings, "next_step": m["step"], "last_sharpness": m["last_sharpness"]}
        _io.write(path, _CHECKPOINT, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, settings: dict[str, Any], theta0: torch.Tensor, problem: Problem) -> _Run:
        """The state saved by :meth:`save`, checked against this run's settings, starting point and problem."""
        tensors, header = _io.read(path, _CHECKPOINT)
        meta = header["meta"]
        differ = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
        if differ:
            raise InputError(
                f"{path}: this checkpoint is of another run; its settings differ from these in "
                + ", ".join(f"{k} (file {a!r}, now {b!r})" for k, (a, b) in differ.items())
                + ". Pass the run's own settings, or another resume file."
            )
        dev, dt, d = theta0.device, theta0.dtype, problem.dim
        steps, n_eigs = settings["steps"], settings["n_eigs"]
        try:
            start = cls.start(theta0, steps, n_eigs, settings["store_every"], settings["noise"], settings["noise_seed"])
            for name, ref in start.hist.items():
                _same_layout(tensors[f"history.{name}"], ref, f"history.{name}")
            _same_layout(tensors["theta"], theta0, "theta")
            stored = tensors["stored"].to(dev)
            if stored.dtype != dt or stored.dim() != 2 or stored.shape[1] != d:
                raise FileFormatError(f"tensor 'stored' has dtype {stored.dtype} and shape {tuple(stored.shape)}")
            if stored.shape[0] and not torch.equal(stored[0], theta0):
                raise InputError(f"{path}: this checkpoint's run started from another theta0; pass that one.")
            if stored.shape[0] > start.stored.shape[0]:
                raise FileFormatError(f"tensor 'stored' holds {stored.shape[0]} iterates, more than the run stores")
            start.stored[: stored.shape[0]] = stored
            for name, t in start.hist.items():
                t.copy_(tensors[f"history.{name}"])  # in place: the recorder writes into the same tensors
            start.gen.set_state(tensors["generator"])
            if start.noise_gen is not None:
                start.noise_gen.set_state(tensors["noise_gen"])
            start.recorder.restore(
                OscillationRecorder.from_tensors(
                    {k.removeprefix("recorder."): v.to(dev) for k, v in tensors.items() if k.startswith("recorder.")}
                )
            )
            run = dataclasses.replace(
                start,
                step=meta["next_step"],
                theta=tensors["theta"].to(dev),
                stored_steps=tensors["stored_steps"].tolist(),
                block=tensors["block"].to(dev) if "block" in tensors else None,
                U=tensors["U"].to(dev) if "U" in tensors else None,
                last_sharpness=float(meta.get("last_sharpness", math.nan)),
                resumed_at=meta["next_step"],
            )
        except (KeyError, RuntimeError, FileFormatError) as exc:
            raise FileFormatError(f"{path}: the checkpoint's tensors do not fit its settings ({exc}).") from None
        if run.step > steps + 1 or stored.shape[0] != len(run.stored_steps):
            raise FileFormatError(f"{path}: the checkpoint's step {run.step} does not fit a run of {steps} steps.")
        return run


def _same_layout(t: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if t.dtype != ref.dtype or t.shape != ref.shape:
        raise FileFormatError(
            f"tensor {name!r} has dtype {t.dtype} and shape {tuple(t.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
        )


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
