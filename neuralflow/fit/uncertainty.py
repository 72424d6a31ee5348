"""Standard errors of the fitted coefficients: the clustered sandwich and the delta method."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..corrections import HiddenStateLibrary, Hybrid, TermLibrary
from .options import _GN_MAX_PARAMS
from .shooting import _Objective


def _coefficient_map(model: Hybrid, states: Tensor) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Mean coefficient of each term over ``states`` and its gradient w.r.t. the fitted parameters."""
    lib = model.correction
    if isinstance(lib, HiddenStateLibrary):
        coeffs = lib.coefficients(model.flow)
    elif isinstance(lib, TermLibrary):
        coeffs = lib.coefficients_at(states)
    else:
        return {}, {}
    params = [p for p in model.parameters() if p.requires_grad]
    values, grads = {}, {}
    for name, c in coeffs.items():
        m = c.mean()
        values[name] = float(m.detach())
        g = torch.autograd.grad(m, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat(
            [(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, g, strict=True)]
        )
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


def _uncertainty(
    obj: _Objective, r: Tensor, method: str, grads: dict[str, Tensor], regression_se: Tensor | None, lib: Any
) -> dict[str, float]:
    if method == "regression":
        assert regression_se is not None  # the regression computed it
        return {n: float(s) for n, s in zip(lib.terms, regression_se, strict=True)}
    if not grads or len(obj.get()) > _GN_MAX_PARAMS:
        return {n: math.nan for n in grads}
    J = obj.last_jacobian if obj.last_jacobian is not None else obj.jacobian(obj.get(), r)
    n_out, B = obj.win.targets.shape[0] - 1, len(obj.win.train)
    cov = _sandwich(J, r, (n_out, B, obj.model.problem.dim))
    pad = len(cov) - len(next(iter(grads.values())))  # fitted extra-state starts: no coefficient depends on them
    return {
        n: float((g2 @ cov @ g2).clamp_min(0).sqrt())
        for n, g in grads.items()
        for g2 in [torch.cat([g, g.new_zeros(pad)])]
    }
