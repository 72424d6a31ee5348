"""From a ``FitResult`` to a :class:`Report`: contributions, shares, gates, distillation and curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..corrections import (
    HIDDEN_TERMS,
    TERMS,
    HiddenStateLibrary,
    Inspection,
    LatentCorrection,
    NeuralCorrection,
    TermLibrary,
    lag_theory,
)
from ..errors import InputError, NeuralflowError
from ..fit.options import resolved_solver
from ..flows import Approximation, GradientFlow
from ..sparse import SparseSolution, sparse_regression
from .equations import extra_equation
from .formula import gate_formula
from .hidden import (
    all_window_errors,
    edge_approximation,
    fitted_start_notes,
    hidden_contributions,
    hidden_rows,
    hidden_state_evidence,
    latent_rows,
    ode_starts,
    sharpness_at,
    window_rows,
    with_fitted_starts,
)
from .model import Report
from .notation import percent, sig
from .sampling import in_batches, spread
from .summary import RESIDUAL, Gate, TermSummary, _edge_label


class _Verdict(TypedDict):
    """The thresholds that set a report's verdict (see :class:`Report`)."""

    negligible: float
    outside: float
    min_share: float


def shares(contributions: dict[str, Tensor], closed: float) -> dict[str, float]:
    """Each term's share of the gap: ``closed * <C_i, C> / <C, C>``, summed over the states.

    ``contributions`` maps a name to ``C_i`` of shape ``(B, d)`` along the trajectory; ``C`` is
    their sum. The shares add up to ``closed`` (exactly, up to rounding), the rest is unexplained.
    """
    if not contributions:
        return {}
    parts = list(contributions.values())
    total = sum(parts[1:], parts[0])
    norm2 = float((total * total).sum())
    if not norm2 > 0:
        return {name: 0.0 for name in contributions}
    return {name: closed * float((c * total).sum()) / norm2 for name, c in contributions.items()}


def distill(outputs: Tensor, fields: dict[str, Tensor], n_folds: int = 5) -> tuple[dict[str, float], SparseSolution]:
    """Sparse regression of a network correction's outputs onto the library's fields.

    ``outputs`` is ``N`` of shape ``(B, d)`` at ``B`` states of the trajectory and ``fields``
    the unit-coefficient library fields ``F_i`` ``(B, d)`` at the same states. Returns the
    coefficients ``c_i`` of ``N ~ sum_i c_i F_i`` (zero where pruned) by :func:`sparse_regression`
    (support chosen by cross-validation) and the solution, whose ``residual`` is the fraction of
    ``||N||^2`` that the library cannot express.
    """
    names = list(fields)
    if not names:
        raise InputError("distill: the term library is empty; pass at least one term to distill onto.")
    X = torch.stack([fields[n] for n in names], dim=1)
    sol = sparse_regression(X, outputs, n_folds=n_folds)
    return {n: float(c) for n, c in zip(names, sol.coefficients, strict=True)}, sol


# ------------------------------------------------------------------------------------ from a FitResult


def _physics_view(flow: Any, name: str, spec: Any) -> tuple[Approximation | None, float | None]:
    """The approximation a term repairs and its theory value, relative to the physics ``flow``.

    The physics' own approximation that lists the term in ``revised_by`` comes first; otherwise
    the term's generic approximation. The term table's theory values hold relative to gradient
    flow, so they are shown for gradient physics and for physics that lists the term as missing;
    elsewhere only a theory value of 0 (as for ``g``) is shown, since the physics may
    already contain part of the term.
    """
    own = next((a for a in getattr(flow, "approximations", ()) if name in a.revised_by), None)
    if spec is None:
        return own, None
    known = isinstance(flow, GradientFlow) or own is not None or spec.theory == 0
    return own or spec.approximation, spec.theory if known else None


def window_shares(
    result: Any, targets: Any, parts: Any, closed: float, max_states: int, problem: Any
) -> dict[str, float] | None:
    """Each row's share of the gap, window by window; None when the fit's windows cannot be used.

    On the fit's windows (at most ``max_states // 3`` of them, spread), window ``w``'s error
    reduction ``max(E_p,w - E_h,w, 0)`` is split among the rows by their part ``<C_i, C> / <C, C>``
    of the correction's squared norm at the window's first, middle and last target states; the
    shares are then scaled to add up to ``closed``. A row thus gets credit where the correction
    closed the gap, not where its field is merely large (a fast initial transient that the
    physics already follows, say); windows where the correction made things worse credit nobody
    (``closed``, measured on the validation windows, already counts them). ``parts(states)``
    returns the rows' coefficients and contributions there.
    """
    windows = getattr(result, "windows", {}) or {}
    window = int(result.settings.get("window", 0))
    if "step" not in windows or window <= 0 or len(result.window_errors) != len(windows["step"]):
        return None
    which = spread(len(windows["step"]), max(1, max_states // 3), torch.device("cpu"))
    gain = (result.physics_window_errors.cpu() - result.window_errors.cpu()).to(torch.float64)[which]
    gain = torch.nan_to_num(gain, nan=0.0, neginf=0.0).clamp_min(0)
    n_out = window // targets.store_every
    first = torch.searchsorted(targets.steps.cpu(), windows["step"].cpu()[which])
    idx = (first[:, None] + torch.tensor([0, n_out // 2, n_out])[None, :]).reshape(-1)
    at = targets.iterates[idx.to(targets.iterates.device)].to(device=problem.device, dtype=problem.dtype)
    _, contribs = parts(at)
    total = sum(contribs.values())
    per_window = lambda x: x.sum(-1).reshape(len(which), 3).sum(1).cpu().to(torch.float64)
    norm2 = per_window(total * total)
    gain = torch.where(norm2 > 0, gain, torch.zeros_like(gain))
    if not float(gain.sum()) > 0:
        return None
    return {
        k: closed * float((gain * per_window(c * total) / norm2.clamp_min(1e-300)).sum() / gain.sum())
        for k, c in contribs.items()
    }


def _window_curves(
    result: Any, targets: Any, max_windows: int, sharpness: bool, notes: list[str]
) -> dict[str, dict[str, list]]:
    """Loss (and sharpness) at the ends of up to ``max_windows`` windows: targets, physics, hybrid.

    Each window starts at a target state (with the flow's measured extra state, for a flow that carries one; the
    fit's own windows from their fitted starts where the fit fitted them) and is integrated over the fit's window
    with the fit's solver settings, as the fit itself does; the per-window errors come from the fit. A rollout
    that fails is left out, with a line in ``notes``.
    """
    curves: dict[str, dict[str, list]] = {}
    windows = getattr(result, "windows", {}) or {}
    if "step" in windows and len(result.window_errors) == len(windows["step"]):
        curves["distance"] = {
            "step": [int(x) for x in windows["step"]],
            "physics": [float(x) for x in result.physics_window_errors],
            "hybrid": [float(x) for x in result.window_errors],
        }
    model = result.model
    problem = model.problem
    window = int(result.settings.get("window", 0))
    if window <= 0 or max_windows <= 0:
        return curves
    steps = targets.steps.to(problem.device)
    fitted = window_rows(result) if "extra_start" in windows else None
    if fitted is not None:  # fitted starts exist for the fit's own windows only
        pick = spread(len(fitted[0]), max_windows, torch.device("cpu"))
        starts = fitted[0][pick, 0].to(steps.device)
    else:
        start_ok = torch.nonzero(steps + window <= steps[-1]).flatten()
        if len(start_ok) == 0:
            return curves
        starts = start_ok[spread(len(start_ok), max_windows, steps.device)]
    ends = torch.searchsorted(steps, steps[starts] + window)
    x = targets.iterates.to(device=problem.device, dtype=problem.dtype)
    t = torch.tensor([0.0, float(window)], dtype=problem.dtype, device=problem.device)
    kw = resolved_solver(result.settings).odeint_options()
    states = {"observed": x[ends]}
    with torch.no_grad():
        measured = ode_starts(model, targets, starts)  # the physics from the measurement, as the fit compared it
        y0 = measured if fitted is None else with_fitted_starts(result, measured, pick)
        for who, rhs, start in (("physics", model.flow, model.flow_part(measured)[0]), ("hybrid", model, y0)):
            try:
                states[who] = odeint(rhs, start, t, **kw)[-1][:, : problem.dim]
            except NeuralflowError as err:  # e.g. a central flow started above 2/lr: leave that curve out
                notes.append(f"no {who} curve in the figures: {err}")
        end_steps = [int(s) for s in steps[ends]]
        curves["loss"] = {"step": end_steps, **{k: problem.batched_loss(v).tolist() for k, v in states.items()}}
    if sharpness:
        curves["sharpness"] = {"step": end_steps, **{k: sharpness_at(problem, v) for k, v in states.items()}}
    return curves


def build_report(
    result: Any,
    distill_terms: Sequence[str] = ("g", "Hg", "H2g", "D3gg"),
    max_states: int = 100,
    max_windows: int = 20,
    sharpness: bool | None = None,
    n_folds: int = 5,
    batch: int = 32,
    negligible: float = 1e-8,
    outside: float = 0.5,
    min_share: float = 0.05,
    hidden_state: bool = True,
) -> Report:
    """The :class:`Report` of a ``FitResult`` (what ``FitResult.report()`` returns).

    Evaluates the correction at up to ``max_states`` target states spread along the fitted
    trajectory (in batches of ``batch``): each term's contribution, gated coefficients and their
    features, or for a :class:`~neuralflow.corrections.NeuralCorrection` its distillation onto
    ``distill_terms``. Loss (and sharpness, by default when the trajectory recorded it) at the
    ends of up to ``max_windows`` windows feed the figures. ``negligible``, ``outside`` and
    ``min_share`` set the verdict (see :class:`Report`).

    A :class:`~neuralflow.corrections.HiddenStateLibrary` gives one row per term of the extra state's equation and
    the fitted equations (:mod:`neuralflow.report.hidden`).

    Parameters
    ----------
    result : FitResult
        A fit of a hybrid with a correction (:func:`neuralflow.fit.fit`).
    distill_terms : sequence of str, default ("g", "Hg", "H2g", "D3gg")
        Names from :data:`~neuralflow.corrections.TERMS` a :class:`~neuralflow.corrections.NeuralCorrection` is
        distilled onto.
    max_states : int, default 100
        The correction is evaluated at up to this many target states spread along the fitted trajectory.
    max_windows : int, default 20
        Loss (and sharpness) at the ends of up to this many windows feed the figures.
    sharpness : bool, optional
        Evaluate the sharpness at the window ends; None: when the trajectory recorded it.
    n_folds : int, default 5
        Folds of the blocked cross-validation of the sparse regressions (a gate's formula, a network's
        distillation; :mod:`neuralflow.sparse`).
    batch : int, default 32
        States per evaluation of the correction.
    negligible : float, default 1e-8
        The verdict is ``"negligible"`` at a physics error at most this (see :class:`Report`).
    outside : float, default 0.5
        The verdict is ``"revise"`` when the library closes at least this fraction of the gap.
    min_share : float, default 0.05
        An approximation is suggested for revision when its terms' shares add up to at least this.
    hidden_state : bool, default True
        For a :class:`~neuralflow.corrections.TermLibrary`, run the hidden-state diagnostic
        (:func:`~neuralflow.report.hidden.hidden_state_evidence`, with its default settings).

    Returns
    -------
    Report
        The ranked terms, their shares, the verdict and the corrected ODE.

    Raises
    ------
    InputError
        When the fit has no correction (physics alone) or a correction the report cannot read.
    """
    model = result.model
    flow, corr = model.flow, model.correction
    if corr is None:
        raise InputError(
            "build_report: this fit has no correction (physics alone); fit a Hybrid with a TermLibrary "
            "or a NeuralCorrection to get a report."
        )
    problem = model.problem
    targets = result.trajectory  # the fit's targets: GD's iterates or their midpoint process
    verdict: _Verdict = {"negligible": negligible, "outside": outside, "min_share": min_share}
    if isinstance(corr, HiddenStateLibrary):
        return _hidden_state_report(result, max_windows, sharpness, verdict)
    if isinstance(corr, LatentCorrection):
        return _latent_report(result, max_states, max_windows, sharpness, n_folds, batch, verdict)
    idx = spread(len(targets), max_states, targets.iterates.device)
    states = targets.iterates[idx].to(device=problem.device, dtype=problem.dtype)
    state_steps = [int(s) for s in targets.steps[idx]]
    physics_error, hybrid_error = float(result.physics_error), float(result.hybrid_error)
    closed = Report("", 1.0, "", physics_error, hybrid_error, []).closed
    notes: list[str] = []
    gates: dict[str, Gate] = {}
    uncertainty = dict(getattr(result, "uncertainty", {}) or {})
    edge: dict[str, float] = {}  # baseline-gated term -> its coefficient below the edge
    if isinstance(corr, TermLibrary):
        edge = {n: float(corr.gate(n).base.detach()) for n in corr.baseline}
        term_of = {**{n: n for n in corr.terms}, **{_edge_label(n): n for n in edge}}  # row -> library term

        def rows_of(view: Inspection) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            """Each row's coefficient ``(B,)`` and contribution ``(B, d)`` from the library's inspection.

            A baseline-gated term ``c = c0 + change`` gives two rows: coefficients ``c0`` and the
            change; its contribution ``c F`` is split by the switch ``m``: ``(1 - m) c F`` to the
            baseline row (below the edge), ``m c F`` to the edge row (past it, the term's whole value is
            what the oscillation makes of it).
            """
            coef, contrib = {}, {}
            for row, n in term_of.items():
                c, f = view.coefficients[n], view.fields[n]
                if n not in edge:
                    coef[row], contrib[row] = c, c[:, None] * f
                    continue
                m = view.switches[n][:, None]
                if row == n:
                    coef[row], contrib[row] = torch.full_like(c, edge[n]), (1 - m) * c[:, None] * f
                else:
                    coef[row], contrib[row] = c - edge[n], m * c[:, None] * f
            return coef, contrib

        def parts(at: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            return rows_of(in_batches(corr.inspect, at, batch))

        view = in_batches(corr.inspect, states, batch)
        values, contribs = rows_of(view)
        coefficients = {
            n: float(values[n].mean()) if n in corr.gated else float(result.coefficients.get(n, values[n][0]))
            for n in corr.terms
        }
        if corr.gated:
            columns = {name: view.features[:, j] for j, name in enumerate(corr.inspected_features)}
            for key in [n if n not in edge else _edge_label(n) for n in corr.gated]:
                gates[key] = Gate(
                    features={k: tuple(v.tolist()) for k, v in columns.items()},
                    values=tuple(values[key].tolist()),
                    formula=gate_formula(columns, values[key], n_folds=n_folds),
                )
        residual, source = None, "library"
    elif isinstance(corr, NeuralCorrection):
        library = TermLibrary(problem, corr.lr, terms=distill_terms)
        t0 = torch.zeros((), dtype=problem.dtype, device=problem.device)

        def outputs_and_fields(at: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            with torch.no_grad():
                return in_batches(lambda s: corr(t0, s), at, batch), in_batches(library.fields, at, batch)

        def distilled(out: Tensor, at_fields: dict[str, Tensor]) -> dict[str, Tensor]:
            """The distilled terms' contributions and the network's residual ``R = N - sum_i c_i F_i``."""
            contribs = {n: c * at_fields[n] for n, c in coefficients.items()}
            contribs[RESIDUAL] = out - sum(contribs.values(), torch.zeros_like(out))
            return contribs

        def parts(at: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            return {}, distilled(*outputs_and_fields(at))

        outputs, fields = outputs_and_fields(states)
        coefficients, sol = distill(outputs, fields, n_folds=n_folds)
        coefficients = {n: c for n, c in coefficients.items() if c != 0}
        contribs = distilled(outputs, fields)
        uncertainty = {}
        residual, source = None, "neural"
        notes.append(
            f"network correction distilled onto {list(fields)} by sparse regression (terms chosen by "
            f"{n_folds}-fold cross-validation); the library expresses {percent(1 - sol.residual)} of the "
            "network's squared output"
        )
    else:
        raise InputError(
            f"build_report: cannot read a correction of type {type(corr).__name__}; expected a "
            "TermLibrary, a NeuralCorrection, a HiddenStateLibrary or a LatentCorrection."
        )
    share = window_shares(result, targets, parts, closed, max_states, problem)
    if share is None:  # no windows recorded, or none where the correction helped: the states, unweighted
        share = shares(contribs, closed)
    if source == "neural":
        residual = share.pop(RESIDUAL)
    rows = []
    for name, coef in coefficients.items():
        approx, theory = _physics_view(flow, name, TERMS.get(name))
        unc = None if name in edge else uncertainty.get(name)
        rows.append(TermSummary(name, share.get(name, 0.0), coef, unc, theory, approx, gates.get(name)))
        if name in edge:
            key = _edge_label(name)
            rows.append(
                TermSummary(
                    name,
                    share.get(key, 0.0),
                    float(values[key].mean()),
                    None,
                    None,
                    edge_approximation(flow),
                    gates[key],
                    regime="edge",
                )
            )
    has_sharpness = bool(torch.isfinite(result.trajectory.sharpness).any())
    evidence = None
    if source == "library" and hidden_state and physics_error > negligible:
        evidence = hidden_state_evidence(result)
    return Report(
        problem=str(result.trajectory.problem.get("name", problem.name)),
        lr=float(model.lr),
        physics=getattr(flow, "name", type(flow).__name__),
        physics_error=physics_error,
        hybrid_error=hybrid_error,
        terms=rows,
        residual=residual,
        source=source,
        curves=_window_curves(result, targets, max_windows, has_sharpness if sharpness is None else sharpness, notes),
        contributions={"step": state_steps, **{n: c.norm(dim=1).tolist() for n, c in contribs.items()}},
        notes=notes,
        hidden_state=evidence,
        **verdict,
    )


def _hidden_state_report(result: Any, max_windows: int, sharpness: bool | None, verdict: _Verdict) -> Report:
    """The report of a fit whose correction is a HiddenStateLibrary (shares: :mod:`neuralflow.report.hidden`)."""
    model = result.model
    flow = model.flow
    coefficients, share, equation = hidden_rows(result)
    notes = []
    if share is None:
        notes.append("no term's revision lowers the windows' error on its own; the shares are left at 0")
    notes += fitted_start_notes(result)
    held_out = result.windows.get("validation") if getattr(result, "windows", None) else None
    if held_out is not None and bool(held_out.any()) and not bool(held_out.all()):
        notes.append(
            f"gap and shares over all {len(held_out)} windows; on the {int(held_out.sum())} held-out one(s): "
            f"physics {sig(result.physics_error)} -> hybrid {sig(result.hybrid_error)}"
        )
    theory = {
        **{n: s.theory for n, s in HIDDEN_TERMS.items()},
        "floor": flow.hidden_coefficients().get("floor"),
        "lag": lag_theory(resolved_solver(result.settings)),
    }
    uncertainty = dict(getattr(result, "uncertainty", {}) or {})
    rows = [
        TermSummary(
            n,
            (share or {}).get(n, 0.0),
            c,
            uncertainty.get(n),
            theory[n],
            HIDDEN_TERMS[n].approximation,
            regime="hidden",
        )
        for n, c in coefficients.items()
    ]
    return _windowed_report(
        result,
        rows,
        "hidden-state",
        notes,
        max_windows,
        sharpness,
        verdict,
        contributions=hidden_contributions(result),
        extra_equation=equation,
    )


def _windowed_report(
    result: Any,
    terms: list[TermSummary],
    source: str,
    notes: list[str],
    max_windows: int,
    sharpness: bool | None,
    verdict: _Verdict,
    **fields: Any,
) -> Report:
    """The :class:`Report` of a correction read along the fit's windows (a hidden-state library, a latent
    correction): the gap over all windows (:func:`~neuralflow.report.hidden.all_window_errors`) and the curves."""
    model = result.model
    physics_error, hybrid_error = all_window_errors(result)
    has_sharpness = bool(torch.isfinite(result.trajectory.sharpness).any())
    curves = _window_curves(
        result, result.trajectory, max_windows, has_sharpness if sharpness is None else sharpness, notes
    )
    return Report(
        problem=str(result.trajectory.problem.get("name", model.problem.name)),
        lr=float(model.lr),
        physics=getattr(model.flow, "name", type(model.flow).__name__),
        physics_error=physics_error,
        hybrid_error=hybrid_error,
        terms=terms,
        source=source,
        curves=curves,
        notes=notes,
        **fields,
        **verdict,
    )


def _latent_report(
    result: Any, max_states: int, max_windows: int, sharpness: bool | None, n_folds: int, batch: int, verdict: _Verdict
) -> Report:
    """The report of a fit whose correction is a :class:`~neuralflow.corrections.LatentCorrection`: its rows read
    along the fit's windows (:func:`~neuralflow.report.hidden.latent_rows`)."""
    terms, notes = latent_rows(result, max_states, n_folds, batch)
    flow = result.model.flow
    # a flow with its own extra state (the oscillation flow) prints its equations beside the latent one
    own = extra_equation(flow, {}) if flow.hidden_coefficients() else None
    return _windowed_report(result, terms, "latent", notes, max_windows, sharpness, verdict, extra_equation=own)


# ------------------------------------------------------------------------------------------ the ladder
