"""The report's view of hidden state: a fitted extra-state equation, and the diagnostic that one is missing.

Two things a state-only report cannot say (issue "corrections with a hidden state", science notes section 7):

* **A fitted hidden-state correction** (:class:`~neuralflow.corrections.HiddenStateLibrary`): each term of the extra
  state's equation (and the ``dtheta/dt`` terms beside it: the drift coupling, ``PHg``) is a row of the report beside
  its theory value (:data:`~neuralflow.corrections.HIDDEN_TERMS`; the floor's theory is the flow's ``q``, the lag's
  GD's half step less the solver's own, :func:`~neuralflow.corrections.lag_theory`) and the
  approximation it revises, and the fitted equations are printed as equations (:func:`equation_text`,
  :func:`equation_latex`), e.g. ``dX/dt = 2.03 (R X + X R)/2 + 1.1e-20 I``. A term's **share** is what its revision
  prevents: on the fit's windows, ``Delta E_j`` is the increase of the windows' error when term ``j`` alone is put
  back to the physics' coefficient; the shares are ``closed * Delta E_j / sum_k Delta E_k`` (a term whose revision
  hurts gets a negative share). This is a leave-one-out attribution: the revisions' fields live in different parts of
  the state (the extra state's equation, ``dtheta/dt``), so the ``<C_i, C>`` split of the theta terms has no common
  space to work in; it costs one batched window solve per term. The gap, what the fit closed and the shares are
  measured on **all** the fit's windows, training and validation (the held-out windows' figures are a note): at the
  edge of stability the windows differ in kind (quiet stretch, catapult, decay), so one or two held-out windows say
  little about what the correction does, and a handful of coefficients fitted to thousands of residuals gains little
  from fitting in sample.
* **The hidden-state diagnostic** (:func:`hidden_state_evidence`), for a state-only correction
  (:class:`~neuralflow.corrections.TermLibrary`, see its docstring for the statistic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..autodiff import StateDerivatives, top_eigenpairs
from ..corrections import TERMS, TermLibrary
from ..errors import InputError
from ..fit.options import resolved_solver
from ..flows import Approximation
from ..sparse import RESOLUTION
from .equations import extra_equation
from .formula import gate_formula
from .notation import _feature_text, percent, sig
from .sampling import in_batches, spread
from .summary import Gate, TermSummary

__all__ = [
    "HiddenStateEvidence",
    "all_window_errors",
    "hidden_state_evidence",
    "history_approximation",
    "edge_approximation",
    "default_hidden_terms",
]

#: Hidden-state terms a ladder rung fits by default, where its flow supports them: the growth, the
#: amplitude-dependent rate, the floor and the drift coupling (the revisions issue 15 asks the fit to measure).
_DEFAULT_HIDDEN_TERMS = ("floquet", "amplitude", "floor", "drift")


def default_hidden_terms(flow: Any) -> list[str]:
    """The hidden-state terms a ladder fits on ``flow``: those of ``floquet, amplitude, floor, drift`` it supports."""
    supported = flow.hidden_coefficients()
    return [n for n in _DEFAULT_HIDDEN_TERMS if n in supported]


def edge_approximation(flow: Any) -> Approximation:
    """The approximation a coefficient's change at ``lr S = 2`` is attributed to.

    Below the edge the term repairs its own approximation (``Hg``: the continuous-time limit); what
    changes where GD starts to oscillate is the physics' account of the oscillation: its first
    approximation that the oscillation terms (``gradS``, ``gradScrit``) revise, for gradient flow
    "no oscillation"; or, for physics that lists none, "no oscillation in the critical subspace".
    """
    own = next((a for a in getattr(flow, "approximations", ()) if {"gradS", "gradScrit"} & set(a.revised_by)), None)
    return own or TERMS["gradScrit"].approximation


def sharpness_at(problem: Any, states: Tensor) -> list[float]:
    """The top Hessian eigenvalue at each state (warm-started LOBPCG, relative tolerance 1e-3)."""
    out, block = [], None
    for theta in states:
        res = top_eigenpairs(problem, theta, k=1, v0=block, tol=1e-3)
        block = res.block
        out.append(float(res.values[0]))
    return out


# ----------------------------------------------------------------------------- window solves of a fit


def ode_starts(model: Any, targets: Any, rows: Tensor) -> Tensor:
    """The ODE states at the target iterates ``rows``: ``theta``, joined with the flow's measured extra state there."""
    problem = model.problem
    x = targets.iterates[rows].to(device=problem.device, dtype=problem.dtype)
    if getattr(model, "extra_state", None) is None:
        return x
    steps = targets.steps[rows]
    extra = [model.initial_extra(xi, targets, int(k)) for xi, k in zip(x, steps, strict=True)]
    return model.join(x, torch.stack(extra))


def window_rows(result: Any) -> tuple[Tensor, Tensor] | None:
    """Each fitted window's target rows ``(W, n_out + 1)`` and its output times, or None without windows."""
    targets = result.trajectory
    window = int(result.settings.get("window", 0))
    steps = (getattr(result, "windows", {}) or {}).get("step")
    if steps is None or window <= 0 or len(steps) == 0:
        return None
    n_out = window // targets.store_every
    first = torch.searchsorted(targets.steps.cpu(), steps.cpu())
    rows = first[:, None] + torch.arange(n_out + 1)[None, :]
    t = torch.arange(
        0, window + 1, targets.store_every, dtype=result.model.problem.dtype, device=result.model.problem.device
    )
    return rows, t


def window_starts(result: Any, model: Any, rows: Tensor) -> Tensor:
    """The ODE states the fit's windows start from: ``theta`` at each window's first target joined with the measured
    extra state there, or with the window's fitted start (``extra_start="fitted"``: ``result.windows``)."""
    return with_fitted_starts(result, ode_starts(model, result.trajectory, rows[:, 0]))


def with_fitted_starts(result: Any, measured: Tensor, which: Tensor | slice = slice(None)) -> Tensor:
    """``measured`` (the measured starts of the fit's windows ``which``) with each window's fitted extra state in
    place of the measured one, where the fit fitted them (``result.windows["extra_start"]``)."""
    fitted = (getattr(result, "windows", {}) or {}).get("extra_start")
    if fitted is None:
        return measured
    return torch.cat([measured[:, : result.model.problem.dim], fitted[which].to(measured)], dim=1)


def fitted_start_notes(result: Any) -> list[str]:
    """What the report says about the windows' starts of a fit with ``extra_start="fitted"`` (none otherwise)."""
    if result.settings.get("extra_start") != "fitted":
        return []
    if "extra_start" in (getattr(result, "windows", {}) or {}):
        return ["the hybrid's windows start from their fitted extra-state starts, the physics' from the measurement"]
    return [
        "this fit's fitted starts were not recorded (a fit from before they were): its windows are integrated from "
        "the measured extra state, with a latent correction's states at 0; refit to read them as fitted"
    ]


def solve_windows(
    result: Any, model: Any, rows: Tensor, t: Tensor, full: bool = False, y0: Tensor | None = None
) -> Tensor:
    """``theta`` (``full``: the whole ODE state) along every window from its start, ``(n_out + 1, W, d)``, with the
    fit's solver. A window starts from the measured extra state, or from its fitted start where the fit fitted
    them (``extra_start="fitted"``: ``result.windows["extra_start"]``); ``y0``: those starts, computed already
    (:func:`window_starts`)."""
    if y0 is None:
        y0 = window_starts(result, model, rows)
    with torch.no_grad():
        sol = odeint(model, y0, t, **resolved_solver(result.settings).odeint_options())
    return sol if full else sol[..., : model.problem.dim]


def window_errors(result: Any, sol: Tensor, rows: Tensor) -> Tensor:
    """Each window's normalised mean squared distance to its targets (as the fit measures it), ``(W,)``."""
    x = result.trajectory.iterates.to(sol)
    target = x[rows.T.to(x.device)]
    return (sol[1:] - target[1:]).square().sum(-1).mean(0).cpu() / float(result.normaliser)


# ------------------------------------------------------------------------- a hidden-state correction


def all_window_errors(result: Any) -> tuple[float, float]:
    """The physics' and the hybrid's error over all of a fit's windows, training and validation (the fit's own
    per-window errors), for the report of a hidden-state fit (see the module docstring)."""
    return float(result.physics_window_errors.mean()), float(result.window_errors.mean())


def hidden_rows(result: Any) -> tuple[dict[str, float], dict[str, float] | None, dict[str, Any]]:
    """A hidden-state fit's coefficients, each term's leave-one-out share (None without windows) and equation data.

    Shares are defined in the module docstring; they add up to ``closed`` over all the fit's windows.
    """
    model = result.model
    flow, lib = model.flow, model.correction
    with torch.no_grad():
        fitted = {n: float(c) for n, c in lib.coefficients(flow).items()}
    eq = extra_equation(flow, fitted)
    windows = window_rows(result)
    if windows is None:
        return fitted, None, eq
    rows, t = windows
    return fitted, leave_one_out_shares(result, rows, t, {n: lib.deltas[n] for n in lib.terms}), eq


def leave_one_out_shares(
    result: Any, rows: Tensor, t: Tensor, knobs: dict[str, Tensor], y0: Tensor | None = None
) -> dict[str, float] | None:
    """Each named part's share of the gap the fit closed, by leave-one-out (the module docstring): ``knobs`` maps a
    name to the parameters (or a view of them) that zeroing takes out of the model; None when taking every part
    out in turn does not raise the windows' error (nothing to share). ``y0``: the windows' starts, built already
    (:func:`window_starts`)."""
    model = result.model
    physics, hybrid = all_window_errors(result)
    closed = min(max(1.0 - hybrid / physics, 0.0), 1.0) if physics > 0 else 0.0  # as Report.closed
    if y0 is None:  # the starts do not depend on the knobs (an eigen-solve per window): build them once
        y0 = window_starts(result, model, rows)
    full = window_errors(result, solve_windows(result, model, rows, t, y0=y0), rows).mean()
    gains = {}
    for name, knob in knobs.items():
        kept = knob.detach().clone()
        with torch.no_grad():
            knob.zero_()
        try:
            solved = solve_windows(result, model, rows, t, y0=y0)
            gains[name] = float(window_errors(result, solved, rows).mean() - full)
        finally:
            with torch.no_grad():
                knob.copy_(kept)
    total = sum(gains.values())
    if not total > 0:
        return None
    return {n: closed * g / total for n, g in gains.items()}


def hidden_contributions(result: Any) -> dict[str, list[float]]:
    """``|(c_j - p_j) F_j|`` of each term's revision at the window starts (the report's contributions figure)."""
    model = result.model
    flow, lib = model.flow, model.correction
    windows = window_rows(result)
    if windows is None:
        return {}
    rows, t = windows
    own = flow.hidden_coefficients()
    with torch.no_grad():
        _, fields = flow.hidden_fields(t[0], window_starts(result, model, rows), lib.terms)
        coef = {n: float(c) for n, c in lib.coefficients(flow).items()}
    steps = [int(s) for s in result.trajectory.steps[rows[:, 0]]]
    return {"step": steps, **{n: ((coef[n] - own[n]) * fields[n]).norm(dim=1).tolist() for n in lib.terms}}


# ------------------------------------------------------------------------------------ a latent correction

#: The name of a latent correction's direct force ``lr P z`` among the report's rows.
LATENT_FORCE = "Pz"


def latent_rows(result: Any, max_states: int, n_folds: int, batch: int) -> tuple[list[TermSummary], list[str]]:
    """The report's rows of a fitted :class:`~neuralflow.corrections.LatentCorrection`, and its notes.

    The latent states ``z`` exist only along the fit's windows, so the correction is read there: every window is
    integrated from its start (the fitted start with ``extra_start="fitted"``) and up to ``max_states`` of its
    states are sampled. A read-out field ``j`` is a row whose coefficient is ``(W z)_j`` along those states, with
    its best sparse formula in the correction's state features (:func:`~neuralflow.report.formula.gate_formula`):
    where the formula explains little, the coefficient is not a function of the state but of history. The direct
    force is the row ``Pz``, its coefficient ``mean |P z| / mean |g|`` (its size against the gradient step's).
    Shares are leave-one-out on all windows (:func:`leave_one_out_shares`: a read-out row or ``P`` zeroed in turn).
    Every row revises the physics' account of a missing state (:func:`history_approximation`).
    """
    model = result.model
    corr, problem = model.correction, model.problem
    windows = window_rows(result)
    if windows is None:
        raise InputError(
            "build_report: a latent correction is read along the fit's windows, and this result records none; "
            "build the report from the FitResult that nf.fit returned."
        )
    rows, t = windows
    y0 = window_starts(result, model, rows)
    sol = solve_windows(result, model, rows, t, full=True, y0=y0)
    states = sol.reshape(-1, sol.shape[-1])
    states = states[spread(len(states), max_states, states.device)]
    theta, z = states[:, : problem.dim], model.flow_part(states)[1]

    def features_and_gradient(at: Tensor) -> Tensor:
        state = StateDerivatives(problem, at, create_graph=False)
        return torch.cat([corr.state_features(state), state.g], dim=1).detach()

    both = in_batches(features_and_gradient, theta, batch)
    columns = {name: both[:, j] for j, name in enumerate(corr.feature_names)}
    g = both[:, len(corr.feature_names) :]
    knobs = {n: corr.readout[j] for j, n in enumerate(corr.fields)}
    if corr.direct:
        knobs[LATENT_FORCE] = corr.force
    share = leave_one_out_shares(result, rows, t, knobs, y0) or {}
    approximation = history_approximation(model.flow)
    notes = [f"the latent states (m = {corr.m}) are read at {len(states)} states along the fit's {len(rows)} windows"]
    notes += fitted_start_notes(result)
    if not share:
        notes.append("taking out any one latent path does not raise the windows' error; the shares are left at 0")
    terms = []
    with torch.no_grad():
        for j, name in enumerate(corr.fields):
            values = z @ corr.readout[j]
            formula = gate_formula(columns, values, n_folds=n_folds)
            varies = float(values.std()) > RESOLUTION * float(values.abs().max())  # a constant is no history
            if varies and formula.explained < 0.5:
                notes.append(
                    f"the coefficient of {name}, (W z)_{name}, is not a function of the state: its best formula in "
                    f"{list(columns)} explains {percent(max(formula.explained, 0.0))} of it (it carries history)"
                )
            gate = Gate({k: tuple(v.tolist()) for k, v in columns.items()}, tuple(values.tolist()), formula)
            mean = float(values.mean())
            terms.append(TermSummary(name, share.get(name, 0.0), mean, None, 0.0, approximation, gate, "latent"))
        if corr.direct:
            # the mean force over the mean gradient step: a ratio per state would blow up where g ~ 0
            step = g.norm(dim=1).mean().clamp_min(torch.finfo(g.dtype).tiny)
            size = float((z @ corr.force.T).norm(dim=1).mean() / step)
            force = share.get(LATENT_FORCE, 0.0)
            terms.append(TermSummary(LATENT_FORCE, force, size, None, None, approximation, regime="latent"))
    return terms, notes


# ------------------------------------------------------------------------------- the diagnostic


def history_approximation(flow: Any) -> Approximation:
    """The approximation a history-dependent residual says to revise: the physics' account of GD's oscillation,
    its first approximation that the oscillation terms (``gradS``, ``gradScrit``) revise. For the central flow that
    is ``quasi-static-oscillation`` (the oscillation's size slaved to the state), for gradient flow
    ``no-oscillation``, for the oscillation flow ``linear-floquet-growth``."""
    return edge_approximation(flow)


@dataclass(frozen=True)
class HiddenStateEvidence:
    """What :func:`hidden_state_evidence` found: whether a hidden state is missing, and the evidence.

    ``fired`` says whether the statistic passed its significance rule; ``term`` is the library term along whose
    field the contradiction is largest, ``pairs`` the number of contradicting window pairs along it and
    ``windows`` the number of windows that need a term sizeably; ``example`` the strongest pair (window start
    ``steps``, ``features`` {name: [value at each]}, ``needed`` coefficients, known ``within`` +-, the ``compared``
    features); ``radius`` the nearness used, as a fraction
    of each feature's range; ``approximation`` the one to revise.
    """

    fired: bool
    term: str | None
    pairs: int
    windows: int
    radius: float
    example: dict[str, Any]
    approximation: Approximation

    def text(self) -> str:
        """The plain-word statement (for a report whose evidence fired)."""
        ex = self.example
        where = [", ".join(f"{_feature_text(f)} = {sig(v[i])}" for f, v in ex["features"].items()) for i in (0, 1)]
        need = [
            f"{'+' if a > 0 else ''}{sig(a)} (+- {sig(d, 2)})" for a, d in zip(ex["needed"], ex["within"], strict=True)
        ]
        names = " and ".join(ex.get("compared") or ["every feature"])
        kind = "opposite" if ex["needed"][0] * ex["needed"][1] < 0 else "incompatible"
        return (
            f"A hidden state is missing: {self.pairs} pairs of windows that start from nearly the same state "
            f"({names} within {100 * self.radius:.0f} percent of their range along the run) need {kind} "
            f"corrections along {self.term}; e.g. the window at step {ex['steps'][0]} ({where[0]}) needs {need[0]} "
            f"and the one at step {ex['steps'][1]} ({where[1]}) needs {need[1]}. No function of the state gives both "
            "(quiet against oscillating): the missing physics depends on history. Revise "
            f'"{self.approximation.statement.rstrip(".")}" [{self.approximation.name}]: give the model the '
            "oscillation's size as a state (the oscillation flow, nf.OscillationFlow, with a HiddenStateLibrary), or "
            "a latent correction."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fired": self.fired,
            "term": self.term,
            "pairs": self.pairs,
            "windows": self.windows,
            "radius": self.radius,
            "example": self.example,
            "approximation": self.approximation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HiddenStateEvidence:
        approx = d["approximation"]
        return cls(
            bool(d["fired"]),
            d.get("term"),
            int(d["pairs"]),
            int(d["windows"]),
            float(d["radius"]),
            dict(d.get("example", {})),
            Approximation(**{**approx, "revised_by": tuple(approx["revised_by"])}),
        )


def _start_features(result: Any, rows: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The window starts' state features ``{name: (W,)}``: ``lr S - 2`` from the recorded sharpness (computed
    where the run did not record it) and the loss."""
    targets, problem = result.trajectory, result.model.problem
    out = {}
    if "lr_S_minus_2" in names:
        recorded = targets.sharpness[rows, 0].cpu().to(torch.float64) if targets.sharpness.numel() else None
        if recorded is None or not bool(torch.isfinite(recorded).all()):
            states = ode_starts(result.model.flow, targets, rows)[:, : problem.dim]
            recorded = torch.tensor(sharpness_at(problem, states), dtype=torch.float64)
        out["lr_S_minus_2"] = float(result.model.lr) * recorded - 2
    if "loss" in names:
        states = targets.iterates[rows].to(device=problem.device, dtype=problem.dtype)
        out["loss"] = problem.batched_loss(states).detach().cpu().to(torch.float64)
    return out


def hidden_state_evidence(
    result: Any,
    features: tuple[str, ...] = ("lr_S_minus_2", "loss"),
    radius: float = 0.1,
    min_alignment: float = 0.25,
    min_change: float = 0.4,
    min_error: float = 0.1,
    min_pairs: int = 2,
    z: float = 3.0,
) -> HiddenStateEvidence | None:
    """Do windows that start from nearly the same state need incompatible corrections? (None without windows.)

    For a fit of a state-only correction (a :class:`~neuralflow.corrections.TermLibrary`, whose coefficients are
    constants or functions of the state features): integrate the fitted hybrid over each of the fit's windows
    and take what it still misses at each output ``k`` of the window, ``r_w(k) = x(t_w + s_k) - theta_h(t_w + s_k)``
    (``s_k`` the output's time in the window, ``T`` the last).

    * **Needed correction.** Along each library term's unit field ``F_i`` at the window's start ``x_w``, the
      least-squares slope of the path, ``r_w(k) ~ b_w + a_wi s_k F_i`` (``b_w`` a free offset: the noise of the
      window's first iterate, which the whole window inherits): with ``'`` the deviation from the mean over the
      window's outputs, ``a_wi = sum_k s'_k <r'_w(k), F_i> / (sum_k s'_k^2 ||F_i||^2)``, the *extra* constant
      coefficient of term ``i`` window ``w`` alone asks for, to first order in the window's length. It is known
      to within ``d_wi = z * se_wi``, ``se`` the least-squares standard error from the misfit of the path
      (``n d - d - 1`` degrees of freedom for ``n`` outputs in ``d`` dimensions): a missing field makes the miss
      grow steadily along the window, noise in the data does not, so noise gives wide intervals (``z`` = 3 by
      default: three standard errors). A window that misses almost nothing needs ``0 +- d`` with ``d`` small:
      "quiet" is a resolved need too. Windows of fewer than three outputs (start included) give no slope: no
      evidence (None).
    * **A sizeable need.** Window ``w`` *needs* term ``i`` when the hybrid misses a real part of its motion,
      ``||r_w(T)|| >= min_error ||x(t_w + T) - x(t_w)||`` (relative to the window's own displacement, so late windows
      of a decaying run count as much as early ones, and round-off, 1e-12 of the motion, never does), and the
      term's field carries at least ``min_alignment`` of that miss along the path,
      ``(sum_k s'_k <r'_w(k), F_i>)^2 >= min_alignment sum_k ||r'_w(k)||^2 sum_k s'_k^2 ||F_i||^2``. The
      scale of term ``i`` is the largest ``|a_wi|`` over those windows.
    * **Near.** Each feature (``lr S - 2``, the loss; the logarithm of a feature that is positive at every window,
      since a loss falls by orders of magnitude and "nearly the same loss" means a small ratio) is divided by its
      range over the windows (a feature that does not vary is left out); two windows are near when every feature
      is within ``radius`` of the other's.
    * **Contradiction.** A near pair, at least one of which needs term ``i``, whose needs are incompatible:
      ``|a_wi - a_vi| > d_wi + d_vi`` (their intervals are disjoint, so no single coefficient serves both), and
      the difference is at least ``min_change`` of the term's scale and above the numerical resolution
      (:data:`neuralflow.sparse.RESOLUTION` of the scale; smaller differences are ties). The size rule is what
      keeps a state-only coefficient from firing: a smooth function of the state changes by a small part of its
      range between near states. Opposite signs (quiet stretch against catapult on the quasi-static central flow)
      and "nothing against a lot" (the same on gradient flow, where the fitted correction may not have settled
      on the mean of the two) are both contradictions; measuring on the hybrid's residual or the physics' gives
      the same differences for constant coefficients.
    * **Fires** when some term has at least ``min_pairs`` contradicting pairs (reported: the term with most).

    The evidence says the missing physics depends on history, not on the state features; with features that
    miss part of the state (two windows with the same loss and sharpness far apart in ``theta``) it can also
    mean a missing feature, which the report does not claim to rule out.
    """
    lib = result.model.correction
    windows = window_rows(result)
    if not isinstance(lib, TermLibrary) or windows is None:
        return None
    rows, t = windows
    sol = solve_windows(result, result.model, rows, t).cpu()
    x = result.trajectory.iterates.cpu().to(sol.dtype)
    target = x[rows.T]
    residual = (target - sol)[1:]  # (n, W, d)
    n_out, _, dim = residual.shape
    if n_out < 2:
        return None
    sizeable = residual[-1].norm(dim=1) >= min_error * (target[-1] - target[0]).norm(dim=1)
    residual = residual - residual.mean(0)
    s_k = t[1:].cpu().to(sol.dtype)
    s_k = s_k - s_k.mean()
    r2 = residual.square().sum((0, 2))
    starts = x[rows[:, 0]].to(device=result.model.problem.device, dtype=result.model.problem.dtype)
    fields = {n: f.cpu().to(sol.dtype) for n, f in lib.fields(starts).items()}
    values = _start_features(result, rows[:, 0], features)
    scaled = []  # (label, feature scaled to its range) of each feature that varies
    for name, v in values.items():
        label = _feature_text(name)
        if bool((v > 0).all()):
            v, label = v.log(), f"log {label}"
        span = float(v.max() - v.min())
        if span > RESOLUTION * max(float(v.abs().max()), 1e-300):
            scaled.append((label, (v - v.min()) / span))
    near = torch.ones(len(rows), len(rows), dtype=torch.bool)
    for _, v in scaled:
        near &= (v[:, None] - v[None, :]).abs() <= radius
    best: tuple[int, str | None, dict[str, Any]] = (0, None, {})
    n_windows = 0
    for name, F in fields.items():
        phi2 = float(s_k.square().sum()) * F.square().sum(1)  # sum_k ||s_k F||^2 per window
        valid = phi2 > 0
        dot = (s_k[:, None] * (residual * F[None]).sum(-1)).sum(0)
        amp = dot / phi2.clamp_min(1e-300)
        misfit = (r2 - amp * dot).clamp_min(0)  # sum_k ||r(k) - a s_k F||^2 (least-squares identity)
        spread = z * (misfit / max(n_out * dim - dim - 1, 1) / phi2.clamp_min(1e-300)).sqrt()
        needs = valid & sizeable & (dot.square() >= min_alignment * r2 * phi2)
        n_windows = max(n_windows, int(needs.sum()))
        if not bool(needs.any()):
            continue
        scale = float(amp[needs].abs().max())
        diff = (amp[:, None] - amp[None, :]).abs()
        pair = (
            near
            & valid[:, None]
            & valid[None, :]
            & (needs[:, None] | needs[None, :])
            & (diff > spread[:, None] + spread[None, :])
            & (diff >= min_change * scale)
            & (diff > RESOLUTION * scale)
        )
        pair = torch.triu(pair, diagonal=1)
        count = int(pair.sum())
        if count > best[0]:
            i, j = max(pair.nonzero().tolist(), key=lambda p: float(diff[p[0], p[1]]))
            example = {
                "steps": [int(result.trajectory.steps[rows[k, 0]]) for k in (i, j)],
                "features": {f: [float(v[i]), float(v[j])] for f, v in values.items()},
                "needed": [float(amp[i]), float(amp[j])],
                "within": [float(spread[i]), float(spread[j])],
                "compared": [label for label, _ in scaled],
            }
            best = (count, name, example)
    count, term, example = best
    return HiddenStateEvidence(
        count >= min_pairs, term, count, n_windows, float(radius), example, history_approximation(result.model.flow)
    )
