"""The fit's optimisers: Gauss-Newton (Levenberg-Marquardt, resumable), LBFGS and Adam."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import _io
from ..errors import DivergenceError, FileFormatError, InputError
from ..problems import check_positive_int
from .options import _DEFAULT_ITERS, _GN_MAX_PARAMS
from .shooting import SolverFailure, _Objective, _Optimisable


def _optimise(
    obj: _Optimisable,
    optimizer: str,
    max_iters: int | None,
    patience: int,
    tol: float,
    learning_rate: float,
    history: list[dict[str, float]],
    progress: bool,
    resume: str | os.PathLike | None = None,
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
    best: dict[str, Any] = {"score": math.inf, "params": obj.get(), "iteration": 0, "stale": 0}
    bar = tqdm(total=iters, desc=f"fit {optimizer}", disable=not progress, unit="it")

    def record(it: int, train_loss: float, params: Tensor) -> bool:
        """Log one iteration; ``train_loss`` and the validation loss were evaluated at ``params``."""
        val = obj.val_loss
        history.append(
            {
                "iteration": it,
                "train_loss": train_loss,
                "val_loss": val,
                "time": time.perf_counter() - t_start,
                "n_function_evals": obj.counted.n,
            }
        )
        score = val if math.isfinite(val) else train_loss
        if score < best["score"]:
            best.update(score=score, params=params.clone(), iteration=it, stale=0)
        else:
            best["stale"] += 1
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val:.4g}")
        if it:
            bar.update(1)
        return best["stale"] >= patience

    step = gauss_newton if optimizer == "gauss-newton" else _torch_optimiser
    saver = None
    if resume is not None:
        if optimizer != "gauss-newton":
            raise InputError(f"fit: resume= needs the gauss-newton optimiser, not {optimizer!r}.")
        assert isinstance(obj, _Objective)  # a fit to several runs is not resumable
        saver = _GaussNewtonCheckpoint(resume, obj, settings or {}, best, history)
        step = saver.wrap(step)
    interrupted = False
    try:
        step(obj, optimizer, iters, tol, learning_rate, record)
        if saver is not None:
            saver.finish()
    except KeyboardInterrupt:  # keep the best parameters; fit() evaluates them and raises Interrupted
        interrupted = True
    except SolverFailure as exc:
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


def gauss_newton(
    obj: _Optimisable,
    optimizer: str,
    iters: int,
    tol: float,
    learning_rate: float,
    record,
    xtol: float = 1e-5,
    start: dict[str, Any] | None = None,
    after=None,
) -> None:
    """Levenberg-Marquardt on the residual vector with finite-difference sensitivities ``J``.

    Each iteration costs ``P + 1`` forward solves (no backward pass): ``J`` by one-sided
    differences, then the step ``(J^T J + mu diag(J^T J)) delta = -J^T r``, accepted if the loss
    decreases (a trial point whose solve fails, e.g. a window that diverges, is a rejected one). For constant
    coefficients the residuals are nearly linear in them, so a handful of iterations suffice. Stops when the loss
    decreases by less than ``tol`` relative or the parameters move by less than ``xtol`` relative.

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
            try:
                new_r = obj.residuals(grad=False)
                new_loss = float(new_r.square().sum())
            except SolverFailure:  # a trial point whose solve fails is a rejected step: shorten it
                new_loss = math.inf
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

    def __init__(
        self,
        path: str | os.PathLike,
        obj: _Objective,
        settings: dict[str, Any],
        best: dict[str, Any],
        history: list[dict[str, float]],
    ) -> None:
        self.path, self.obj, self.best, self.history = Path(path), obj, best, history
        digest = hashlib.sha256(obj.win.targets.detach().cpu().contiguous().numpy().tobytes())
        digest.update(obj.win.steps.cpu().numpy().tobytes())
        self.identity = {"settings": json.loads(json.dumps(settings)), "targets_sha256": digest.hexdigest()}
        self.state: dict[str, Any] | None = None
        if self.path.exists():
            self.state = self._load()

    def _load(self) -> dict[str, Any]:
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
        self.best.update(
            score=meta["best_score"],
            params=tensors["best"].to(current.device),
            iteration=meta["best_iteration"],
            stale=meta["stale"],
        )
        return {
            "iteration": meta["iteration"],
            "params": tensors["params"].to(current.device),
            "mu": meta["mu"],
            "finished": meta["finished"],
        }

    def save(self, iteration: int, params: Tensor, mu: float, finished: bool = False) -> None:
        meta = {
            **self.identity,
            "iteration": iteration,
            "mu": mu,
            "finished": finished,
            "history": self.history,
            "best_score": self.best["score"],
            "best_iteration": self.best["iteration"],
            "stale": self.best["stale"],
        }
        _io.write(self.path, _FIT_CHECKPOINT, {"params": params, "best": self.best["params"]}, meta)

    def wrap(self, step):
        """``step`` (Gauss-Newton) started from the saved state, saving after every iteration."""

        def resumed(obj, optimizer, iters, tol, learning_rate, record) -> None:
            if self.state is not None and self.state["finished"]:
                return
            step(
                obj,
                optimizer,
                iters,
                tol,
                learning_rate,
                record,
                start=self.state,
                after=lambda it, p, mu: self.save(it, p, mu),
            )

        return resumed

    def finish(self) -> None:
        self.save(self.best["iteration"], self.best["params"], math.nan, finished=True)


def _torch_optimiser(obj: _Optimisable, optimizer: str, iters: int, tol: float, learning_rate: float, record) -> None:
    """LBFGS (strong Wolfe line search) or Adam on the fit loss."""
    params = obj.params
    opt: torch.optim.Optimizer
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
