"""The derivative regressions (SINDy-style least squares; gated, by variable projection) and
:func:`coefficient_profile`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._display import columns, data_frame
from ..corrections import Hybrid, TermLibrary
from ..errors import InputError
from ..problems import check_positive_int
from ..trajectory import Trajectory
from .options import _SWITCH_OPEN, _check_exclude, _check_inputs
from .windows import _make_windows, _Windows


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

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[mask]

        return replace(
            self,
            G=self.G[mask],
            h=self.h[mask],
            q=self.q[mask],
            f=self.f[mask],
            steps=self.steps[mask],
            lr_S_minus_2=pick(self.lr_S_minus_2),
            features=pick(self.features),
            amplitude=pick(self.amplitude),
        )


def _regression_system(model: Hybrid, targets: Trajectory, win: _Windows, balance: bool = False) -> _RegressionSystem:
    """Evaluate the regression's fields, targets and gate inputs once, at the training windows' interior points.

    ``balance=True`` returns the system weighted as in :func:`_balanced` over ``window + 1`` points.
    """
    lib = model.correction
    assert isinstance(lib, TermLibrary)  # the callers regress only a term library
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
        inputs = lib.regression_inputs(xs)
        A = inputs.fields  # (n, d, P)
        G.append(A.transpose(1, 2) @ A)
        hs.append(torch.einsum("ndp,nd->np", A, b))
        q.append(b.square().sum(1))
        f.append(fp.square().sum(1))
        if inputs.lr_S_minus_2 is not None and inputs.features is not None:  # a gated library
            gate_in.append(inputs.lr_S_minus_2)
            feats.append(inputs.features)
        if inputs.amplitude is not None:
            amps.append(inputs.amplitude)
    system = _RegressionSystem(
        torch.cat(G),
        torch.cat(hs),
        torch.cat(q),
        torch.cat(f),
        x.shape[1],
        steps,
        torch.cat(gate_in) if lib.gated else None,
        torch.cat(feats) if lib.gated else None,
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
        cols = {
            "step": self["step"],
            **self["coefficients"],
            **{f"se_{k}": v for k, v in self["se"].items()},
            "unexplained": self["unexplained"],
        }
        return data_frame(columns(cols)).set_index("step")


def coefficient_profile(
    model: Hybrid,
    trajectory: Trajectory,
    bin: int = 20,
    target: str = "smoothed",
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
    return CoefficientProfile(
        {
            "step": torch.stack([r[0] for r in rows]),
            "coefficients": {n: coefs[:, j] for j, n in enumerate(lib.terms)},
            "se": {n: ses[:, j] for j, n in enumerate(lib.terms)},
            "unexplained": torch.stack([r[3] for r in rows]),
        }
    )


def _reset_gates(lib: TermLibrary, seed: int) -> None:
    """Gates back to their initial state (amplitude 0, gain 20, margin 0.05, zero last layer), first layers seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in map(lib.gate, lib.gated):
            gate.scale.zero_()
            if hasattr(gate, "base"):
                gate.base.zero_()
            if hasattr(gate, "weights"):
                gate.weights.zero_()
            gate.gain.fill_(20.0)
            gate.margin.fill_(0.05)
            first, last = gate.net[0], gate.net[2]
            assert isinstance(first, torch.nn.Linear) and isinstance(last, torch.nn.Linear)
            bound = 1 / math.sqrt(first.in_features)  # PyTorch's default Linear init, from a seeded generator
            for p in (first.weight, first.bias):
                p.copy_((2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1).to(p.device) * bound)
            last.weight.zero_()
            last.bias.zero_()


def _gated_regression(
    lib: TermLibrary,
    system: _RegressionSystem,
    min_norm: float,
    max_iters: int,
    init: str,
    seed: int,
    settings: dict[str, Any],
    progress: bool,
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
    edge, features = system.lr_S_minus_2, system.features
    assert edge is not None and features is not None  # a gated library's system carries its gates' inputs
    N, P = h.shape
    w = min_norm * float(q.mean()) / max(float(system.f.mean()), 1e-300)
    total = float(q.sum())
    if init != "current":
        _reset_gates(lib, seed)
    gates = [lib.gate(names[j]) for j in gi]
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
        for j, gate, col in zip(gi, gates, offsets, strict=True):
            m = gate.switch(edge, features)
            if float(m.detach().max()) < _SWITCH_OPEN:
                # a switch that never opens is off: otherwise its exponential tail times a huge scale
                # would stand in for a smooth function of lr S - 2, which is not a gate
                m = m * 0.0  # (kept in the graph: with every gate closed the objective is still differentiable)
            B[:, j, col] = m
            if amp is not None:
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

    params = [p for g in gates for p in g.switch_parameters()]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iters,
        max_eval=2 * max_iters,
        history_size=50,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )
    curve: list[float] = []
    bar = tqdm(total=max_iters, desc="gated regression", disable=not progress, unit="eval")

    best_loss, best_params = math.inf, [p.detach().clone() for p in params]

    def closure() -> Tensor:
        nonlocal best_loss, best_params
        opt.zero_grad()
        loss = objective()
        loss.backward()
        value = float(loss.detach())
        curve.append(value)
        if value < best_loss:  # NaN never is: a line search that saturates a switch cannot lose the best gates
            best_loss, best_params = value, [p.detach().clone() for p in params]
        bar.update(1)
        return loss

    with torch.enable_grad():
        opt.step(closure)
    bar.close()
    with torch.no_grad():
        for p, b in zip(params, best_params, strict=True):
            p.copy_(b)
        c, theta = coefficients()
        for k, j in enumerate(ci):
            lib.constants[names[j]].copy_(theta[k])
        for gate, col in zip(gates, offsets, strict=True):
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
