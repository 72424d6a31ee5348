"""Sparse regression: a short formula from a library of candidate columns.

``y ~ X c`` with most ``c_j`` exactly zero, the support chosen by blocked cross-validation. The
report uses it twice: to distil a network correction onto the library fields, and to summarise a
gated coefficient by a short formula of the state features. Kept apart from the report, as PySINDy
keeps its optimisers apart from its model.

Numerical resolution. The held-out errors come from normal equations,
``||y_f - X_f c||^2 = y_f.y_f - 2 c.b_f + c.G_f.c``, whose terms cancel when a support fits
exactly; what is left is round-off whose size and sign depend on the BLAS kernel the CPU selects.
Errors below the resolution of that cancellation are therefore ties (set to zero), the one-standard-
error cut has the same floor, and a coefficient below :data:`PRUNE` of the target is removed. So a
support that fits exactly wins by being sparsest, never by the last bits of a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

__all__ = ["SparseSolution", "sparse_regression", "cv_folds", "RESOLUTION", "PRUNE"]

#: Relative resolution of a held-out error computed from normal equations, per unit of the size of the
#: cancelling terms: 1e4 float64 epsilons, a margin of 100-1000 over the spread between BLAS kernels
#: seen on noise-free problems (1e-16 to 1e-14).
RESOLUTION = 1e4 * float(np.finfo(np.float64).eps)

#: A coefficient whose column contributes less than this fraction of ``||y||`` is pruned (unit-norm columns).
PRUNE = 1e-10


@dataclass(frozen=True)
class SparseSolution:
    """Result of :func:`sparse_regression`: ``coefficients`` (p,), zeros outside the chosen support.

    ``residual`` is the fraction of ``||y||^2`` left unexplained; ``explained`` the fraction of the
    variance of ``y`` about its mean that the fit explains; ``supports`` the candidate supports
    (boolean ``(n, p)``) and ``cv_error`` their held-out relative errors (zero where below the
    numerical resolution).
    """

    coefficients: np.ndarray
    residual: float
    explained: float
    supports: np.ndarray
    cv_error: np.ndarray


def _lsq(G: np.ndarray, b: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Least squares on normal equations ``G c = b`` restricted to ``support``."""
    coef = np.zeros(len(b))
    if support.any():
        coef[support] = np.linalg.lstsq(G[np.ix_(support, support)], b[support], rcond=1e-12)[0]
    return coef


def _stlsq_supports(G: np.ndarray, b: np.ndarray, n_thresholds: int = 40, max_iter: int = 25) -> list[np.ndarray]:
    """Supports of sequentially thresholded least squares (Brunton, Proctor, Kutz, PNAS 2016) on a threshold grid.

    ``G`` and ``b`` are normal equations of unit-norm columns and target, so a threshold is a
    relative contribution.
    """
    top = float(np.abs(_lsq(G, b, np.diag(G) > 0)).max(initial=0.0)) or 1.0
    out = []
    for threshold in np.concatenate([[0.0], np.geomspace(1e-4 * top, top, n_thresholds)]):
        active = np.diag(G) > 0
        for _ in range(max_iter):
            keep = active & (np.abs(_lsq(G, b, active)) >= threshold)
            if (keep == active).all():
                break
            active = keep
        out.append(active)
    return out


def _forward_supports(G: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Supports of forward stepwise selection: add, one at a time, the column that lowers the error most."""
    p = len(b)
    support = np.zeros(p, dtype=bool)
    out = []
    for _ in range(p):
        best, best_sse = -1, math.inf
        for j in np.nonzero(~support & (np.diag(G) > 0))[0]:
            trial = support.copy()
            trial[j] = True
            c = _lsq(G, b, trial)
            sse = -2 * c @ b + c @ G @ c
            if sse < best_sse:
                best, best_sse = int(j), sse
        if best < 0:
            break
        support = support.copy()
        support[best] = True
        out.append(support)
    return out


def cv_folds(n: int, n_folds: int, blocks_per_fold: int = 5) -> tuple[np.ndarray, int]:
    """Fold of each of ``n`` ordered samples, and the buffer ``h``: hv-block cross-validation.

    Neighbouring states of a trajectory are correlated, so folds are made of contiguous blocks (random
    folds would leak). Each fold gets ``blocks_per_fold`` blocks dealt over the whole trajectory (at
    least two samples a block where ``n`` allows), so a term active only near one end of the run (a
    ``relu`` switched on shortly before it ends) has training data in every fold; with one block per
    fold, the fold holding the whole active region leaves the term undetermined and unvalidated. The
    ``h`` samples on each side of a held-out block (one block) are left out of that fold's training
    set, so that a smooth coefficient is not validated by interpolation across a short gap (Racine,
    J. Econometrics 2000, hv-block cross-validation). A term active over fewer than about three
    blocks (12 percent of the run with 5 folds) still cannot be validated.
    """
    n_blocks = max(n_folds, min(n_folds * blocks_per_fold, n // 2))
    block = np.arange(n) * n_blocks // n
    return block % n_folds, int(round(n / n_blocks))


def training_masks(fold: np.ndarray, n_folds: int, h: int) -> np.ndarray:
    """``(n_folds, n)``: the samples that train fold ``f``, neither in it nor within ``h`` of it."""
    held = fold[None, :] == np.arange(n_folds)[:, None]
    near = held.copy()
    for shift in range(1, h + 1):
        near[:, shift:] |= held[:, :-shift]
        near[:, :-shift] |= held[:, shift:]
    return ~near


def sparse_regression(X: Tensor, y: Tensor, n_folds: int = 5) -> SparseSolution:
    """Sparse least squares ``y ~ X c``, the support chosen by blocked cross-validation.

    ``X`` is ``(B, p)`` with ``y`` ``(B,)`` (one scalar per sample), or ``(B, p, m)`` with ``y``
    ``(B, m)`` (one vector field per sample, e.g. the library fields at ``B`` states). Candidate
    supports are the empty one and those of sequentially thresholded least squares over a grid
    of thresholds (Brunton, Proctor, Kutz, PNAS 2016) and of forward stepwise selection, which
    stays sensible when library fields are nearly collinear along a trajectory and thresholding
    large cancelling coefficients would prune the wrong ones. Samples are split into ``n_folds``
    folds of contiguous blocks (:func:`cv_folds`); each support's held-out relative error
    ``||y_f - X_f c||^2 / ||y_f||^2`` is averaged over the folds (relative, so that states with
    large fields do not dominate), and the sparsest support within one standard error of the best
    is chosen (the one-standard-error rule, Hastie, Tibshirani, Friedman, ESL 7.10). Held-out
    errors below their numerical resolution (:data:`RESOLUTION` times the size of the cancelling
    terms) are ties at zero, and the cut is at least the best support's resolution. Coefficients
    below :data:`PRUNE` of ``||y||`` are dropped. Only ``p x p`` sufficient statistics per sample
    are formed, so ``m`` may be the dimension of a large network.
    """
    if X.dim() == 2:
        X, y = X.unsqueeze(-1), y.unsqueeze(-1)
    if X.dim() != 3 or y.shape != (X.shape[0], X.shape[2]):
        raise InputError(
            f"sparse_regression: X must be (B, p) with y (B,), or (B, p, m) with y (B, m); got "
            f"{tuple(X.shape)} and {tuple(y.shape)}."
        )
    B, p = X.shape[0], X.shape[1]
    n_folds = max(2, min(n_folds, B))
    fold, h = cv_folds(B, n_folds)
    train = torch.as_tensor(training_masks(fold, n_folds, h), device=X.device, dtype=torch.float64)
    held = torch.as_tensor(fold[None, :] == np.arange(n_folds)[:, None], device=X.device, dtype=torch.float64)
    X64, y64 = X.to(torch.float64), y.to(torch.float64)
    # Per-sample sufficient statistics X^T X, X^T y, y^T y, summed over each fold's training and held-out samples.
    Gs, bs = torch.einsum("bim,bjm->bij", X64, X64), torch.einsum("bim,bm->bi", X64, y64)
    yys = (y64 * y64).sum(-1)
    G, b, yy = (torch.tensordot(held, t, dims=1).cpu().numpy() for t in (Gs, bs, yys))
    Gtrain, btrain = (torch.tensordot(train, t, dims=1).cpu().numpy() for t in (Gs, bs))
    ysum, count = float(y64.sum()), float(y64.numel())
    Gall, ball, yyall = G.sum(0), b.sum(0), float(yy.sum())
    # Unit-norm columns and target.
    scale = np.sqrt(np.clip(np.diag(Gall), 0, None))
    scale[scale == 0] = 1.0
    ynorm = math.sqrt(yyall) if yyall > 0 else 1.0
    norm = lambda g, v: (g / np.outer(scale, scale), v / scale / ynorm)
    Gn, bn = norm(Gall, ball)
    candidates = [np.zeros(p, dtype=bool), *_stlsq_supports(Gn, bn), *_forward_supports(Gn, bn)]
    supports = np.unique(np.array(candidates), axis=0)
    errors = np.zeros((len(supports), n_folds))
    resolution = np.zeros((len(supports), n_folds))
    for f in range(n_folds):
        Gt, bt = norm(Gtrain[f], btrain[f])
        Gf, bf = norm(G[f], b[f])
        yf = max(yy[f] / ynorm**2, 1e-12)  # a fold where y vanishes: errors relative to 1e-12 of ||y||^2
        for k, support in enumerate(supports):
            c = _lsq(Gt, bt, support)
            errors[k, f] = (yf - 2 * c @ bf + c @ Gf @ c) / yf
            resolution[k, f] = RESOLUTION * (yf + 2 * np.abs(c) @ np.abs(bf) + np.abs(c) @ np.abs(Gf) @ np.abs(c)) / yf
    errors[errors <= resolution] = 0.0
    mean = errors.mean(1)
    se = errors.std(1, ddof=1) / math.sqrt(n_folds)
    best = int(np.argmin(mean))
    cut = mean[best] + max(se[best], resolution[best].mean())
    ok = np.nonzero(mean <= cut)[0]
    choice = int(ok[np.lexsort((mean[ok], supports[ok].sum(1)))[0]])
    support = supports[choice]
    cn = _lsq(Gn, bn, support)
    if (small := support & (np.abs(cn) < PRUNE)).any():
        cn = _lsq(Gn, bn, support & ~small)
    sse = max(1.0 - 2 * cn @ bn + cn @ Gn @ cn, 0.0) * ynorm**2
    tss = yyall - ysum**2 / count
    if tss > 1e-24 * max(yyall, 1e-300):
        explained = 1.0 - sse / tss
    else:  # y is constant: explained iff reproduced
        explained = float(sse <= 1e-24 * max(yyall, 1e-300))
    return SparseSolution(
        coefficients=cn * ynorm / scale,
        residual=float(sse / yyall) if yyall > 0 else 0.0,
        explained=float(explained),
        supports=supports,
        cv_error=mean,
    )
