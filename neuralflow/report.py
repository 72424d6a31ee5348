"""Explain a fitted correction: which approximation of the physics to revise (stage 6).

A fitted hybrid ``dtheta/dt = physics(theta) + sum_i c_i(theta) F_i(theta)`` is read back as a
ranked table of terms, each tied to the :class:`~neuralflow.flows.Approximation` it repairs,
plus plain-word suggestions, the corrected ODE in LaTeX, and figures.

Definitions (used everywhere below; all sums run over the states of the fitted trajectory):

* **gap**: the fit's physics-only error ``E_p`` (``FitResult.physics_error``, the normalised mean
  squared distance of the physics' windows to the targets); the hybrid leaves ``E_h``.
* **closed**: ``1 - E_h / E_p``, clipped to ``[0, 1]``: the fraction of the gap the correction closed.
* **unexplained**: ``1 - closed``, what the hybrid still misses.
* **share** of term ``i``: its part of ``closed``, window by window: each window's error
  reduction ``max(E_p,w - E_h,w, 0)`` is split among the terms by ``<C_i, C> / <C, C>`` at the
  window's states, with ``C_i = c_i F_i`` the term's contribution and ``C = sum_i C_i`` the whole
  correction: the term's part of the correction's squared norm (the exact decomposition
  ``<C, C> = sum_i <C_i, C>``; a term that partly cancels another gets a negative share); the
  shares are scaled to add up to ``closed``. So a term is credited where the correction closed
  the gap, not where its field is merely large. Shares and the unexplained part sum to 100 percent.
* A gated term listed in the library's ``baseline`` (coefficient ``c_0`` below the edge of
  stability plus a gated change at ``lr S = 2``, ``c = c_0 + m (...)`` with ``m`` the switch) gives
  two rows. The baseline row (coefficient ``c_0``) repairs the term's own approximation and gets
  its contribution below the edge, ``(1 - m) c F``; the edge row (coefficient ``c - c_0``, the
  change) gets it past the edge, ``m c F``, and is attributed to the physics' account of the
  oscillation (for gradient flow "no oscillation"): past the edge the term's whole value is what
  the oscillation makes of it.
* A distilled :class:`~neuralflow.corrections.NeuralCorrection` (network output ``N``) is
  regressed onto the library fields, ``N ~ sum_i c_i F_i``, by sparse regression (the supports of
  sequentially thresholded least squares, Brunton, Proctor, Kutz, PNAS 2016, and of forward
  stepwise selection, the sparsest within one standard error of the best by cross-validation); the
  remainder ``R = N - sum_i C_i`` is one more row, "residual (not in the library)", with share
  ``closed * <R, N> / <N, N>``.
* A gated coefficient ``c_i(x)`` (a function of scalar state features such as ``lr S - 2``) is
  summarised by the same sparse regression on the basis ``{1, x, x^2, relu(x - x0), step(x - x0)}``
  of each feature (``x0`` the edge of stability, ``lr S = 2``, where the feature has one), reported
  with the fraction of the coefficient's variance it explains.

A :class:`~neuralflow.corrections.HiddenStateLibrary` (terms of a flow's extra-state equation) and the
hidden-state diagnostic of a state-only correction are read by :mod:`neuralflow.hidden_report`.

The core (:class:`Report`) holds plain numbers only, so a report round-trips through JSON
(:meth:`Report.to_dict` / :meth:`Report.from_dict`) and renders without recomputing anything;
:func:`build_report` computes those numbers from a ``FitResult``, and :func:`ladder` fits one
library on several physics models and tabulates how the gap shrinks.
"""

from __future__ import annotations

import dataclasses
import html
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._display import data_frame, html_table
from .errors import InputError, NeuralflowError
from .flows import Approximation
from .sparse import SparseSolution, sparse_regression

__all__ = [
    "Report",
    "TermSummary",
    "Gate",
    "SparseFormula",
    "SparseSolution",
    "sparse_regression",
    "gate_formula",
    "build_report",
    "Ladder",
    "ladder",
]

# ------------------------------------------------------------------------------------------------ notation

#: LaTeX of each candidate vector field at unit coefficient (the term table in the README), step time.
TERM_LATEX: dict[str, str] = {
    "g": r"\eta\,g",
    "Hg": r"\eta^{2}\,H g",
    "H2g": r"\eta^{3}\,H^{2} g",
    "D3gg": r"\eta^{3}\,D^{3}L[g,g]",
    "gradS": r"\eta\,\nabla S",
    "gradScrit": r"\eta\,\nabla\sum_{\lambda_i\geq 1.95/\eta}\lambda_i",
    "u_ug": r"\eta\,(u\cdot g)\,u",
    "theta": r"\eta\,\theta",
}

#: LaTeX of each physics right-hand side, keyed by the flow's registry name.
PHYSICS_LATEX: dict[str, str] = {
    "gradient": r"-\eta\,g",
    "modified1": r"-\eta\,g-\frac{1}{2}\eta^{2}H g",
    "modified2": r"-\eta\,g-\frac{1}{2}\eta^{2}H g-\eta^{3}\left(\frac{1}{3}H^{2}g+\frac{1}{12}D^{3}L[g,g]\right)",
    "principal": r"\sum_i\frac{\log(1-\eta\lambda_i)}{\lambda_i}(u_i\cdot g)\,u_i",
    "central": r"-\eta\left(g+\frac{1}{2}\sigma^{2}\nabla S\right)",
}

#: Feature name -> (plain text, LaTeX, knot x0 where the feature crosses the edge of stability).
FEATURE_NOTATION: dict[str, tuple[str, str, float | None]] = {
    "lr_S_minus_2": ("lr S - 2", r"\eta S-2", 0.0),
    "lr_S": ("lr S", r"\eta S", 2.0),
    "loss": ("L", "L", None),
    "sigma2": ("sigma^2", r"\sigma^{2}", None),
}


def _feature_text(name: str) -> str:
    return FEATURE_NOTATION.get(name, (name, "", None))[0]


def _feature_latex(name: str) -> str:
    known = FEATURE_NOTATION.get(name)
    return known[1] if known else r"\mathrm{" + _latex_escape(name) + "}"


def _feature_knot(name: str) -> float | None:
    return FEATURE_NOTATION.get(name, (None, None, None))[2]


def _latex_escape(text: str) -> str:
    return text.replace("\\", "").replace("_", r"\_").replace("{", "").replace("}", "").replace("%", r"\%")


def _term_latex(name: str) -> str:
    return TERM_LATEX.get(name, r"F_{\mathrm{" + _latex_escape(name) + "}}")


def sig(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures (robust to last-digit float noise in golden files)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0 or abs(x) < 1e-300:
        return "0"
    text = f"{x:.{digits}g}"
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    return text


def _sig_latex(x: float, digits: int = 3) -> str:
    text = sig(x, digits)
    if "e" in text:
        mant, exp = text.split("e")
        return rf"{mant}\times 10^{{{exp}}}"
    return text


def theory_text(x: float | None) -> str:
    """A theory value as a simple fraction when it is one (``-1/2``), else to 3 significant figures."""
    if x is None:
        return "-"
    frac = Fraction(x).limit_denominator(48)
    if frac.denominator > 1 and abs(float(frac) - x) < 1e-12:
        return f"{frac.numerator}/{frac.denominator}"
    return sig(x)


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _fixed_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A fixed-width text table: header, rule, rows."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda c: c.replace("|", r"\|")
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)]




# ---------------------------------------------------------------------------------------- gated formula

_BASIS_TEXT = {
    "1": "1", "x": "({x})", "x2": "({x})^2", "relu": "relu({x})", "step": "step({x})", "xon": "({x}) step(lr S - 2)",
}
_BASIS_LATEX = {
    "1": "1",
    "x": r"\left({x}\right)",
    "x2": r"\left({x}\right)^{{2}}",
    "relu": r"\mathrm{{relu}}\left({x}\right)",
    "step": r"\mathrm{{step}}\left({x}\right)",
    "xon": r"\left({x}\right)\mathrm{{step}}\left(\eta S-2\right)",
}


@dataclass(frozen=True)
class SparseFormula:
    """``c(x) = sum_j a_j phi_j(x)``: a sparse formula for a gated coefficient.

    ``basis`` lists ``(kind, feature, knot)`` with kind one of ``1, x, x2, relu, step, xon`` (relu and
    step shifted to ``x - knot``; ``xon`` is ``x step(lr S - 2)``: the feature switched on at the edge
    of stability); ``explained`` is the fraction of the coefficient's variance
    along the trajectory that the formula reproduces.
    """

    basis: tuple[tuple[str, str, float], ...]
    coefficients: tuple[float, ...]
    explained: float

    @staticmethod
    def _argument(feature: str, knot: float, latex: bool) -> str:
        base = _feature_latex(feature) if latex else _feature_text(feature)
        if knot == 0:
            return base
        return f"{base} - {sig(knot)}" if not latex else f"{base}-{_sig_latex(knot)}"

    def _render(self, latex: bool, digits: int) -> str:
        number = _sig_latex if latex else sig
        table = _BASIS_LATEX if latex else _BASIS_TEXT
        space, gap = (r"\,", "") if latex else (" ", " ")
        pieces = []
        for (kind, feature, knot), a in zip(self.basis, self.coefficients):
            arg = self._argument(feature, knot if kind in ("relu", "step") else 0.0, latex)
            mag = number(abs(a), digits)
            term = mag if kind == "1" else mag + space + table[kind].format(x=arg)
            pieces.append(f"{'-' if a < 0 else '+'}{gap}{term}")
        if not pieces:
            return "0"
        joined = gap.join(pieces)
        return joined[1 + len(gap):] if joined.startswith("+") else "-" + joined[1 + len(gap):]

    def text(self, digits: int = 3) -> str:
        """The formula in plain text, e.g. ``-0.4 relu(lr S - 2)``."""
        return self._render(False, digits)

    def latex(self, digits: int = 3) -> str:
        """The formula as LaTeX math."""
        return self._render(True, digits)

    def __str__(self) -> str:
        return self.text()

    def to_dict(self) -> dict[str, Any]:
        return {
            "basis": [list(b) for b in self.basis],
            "coefficients": list(self.coefficients),
            "explained": self.explained,
            "text": self.text(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparseFormula:
        return cls(
            basis=tuple((str(k), str(f), float(x0)) for k, f, x0 in d["basis"]),
            coefficients=tuple(float(a) for a in d["coefficients"]),
            explained=float(d["explained"]),
        )


def gate_formula(features: dict[str, Tensor], values: Tensor, n_folds: int = 5) -> SparseFormula:
    """Sparse formula for a gated coefficient ``values`` (B,) of scalar ``features`` {name: (B,)}.

    Basis: ``1`` and, per feature, ``x``, ``x^2`` and, where the feature has a knot at the edge of
    stability (``lr S - 2`` at 0, ``lr S`` at 2), ``relu(x - x0)`` and ``step(x - x0)``; a feature
    without a knot (``loss``, ``sigma2``) also enters switched on at the edge, ``x step(lr S - 2)``,
    when ``lr_S_minus_2`` is among the features. A column that earlier columns already span is
    dropped, so the formula is unique.
    """
    columns: list[Tensor] = [torch.ones_like(values)]
    basis: list[tuple[str, str, float]] = [("1", "", 0.0)]
    edge = features.get("lr_S_minus_2")
    for name, x in features.items():
        x = x.to(values)
        columns += [x, x * x]
        basis += [("x", name, 0.0), ("x2", name, 0.0)]
        knot = _feature_knot(name)
        if knot is not None:
            columns += [torch.relu(x - knot), (x > knot).to(values)]
            basis += [("relu", name, knot), ("step", name, knot)]
        elif edge is not None:
            columns.append(x * (edge.to(values) > 0).to(values))
            basis.append(("xon", name, 0.0))
    # Drop columns that earlier ones already span (``lr S`` and ``lr S - 2`` give the same relu).
    keep: list[int] = []
    for j, col in enumerate(columns):
        if keep:
            kept = torch.stack([columns[i] for i in keep], dim=1)
            col = col - kept @ torch.linalg.lstsq(kept, col.unsqueeze(1)).solution[:, 0]
        if float(col.norm()) > 1e-9 * max(float(columns[j].norm()), 1e-300):
            keep.append(j)
    columns, basis = [columns[i] for i in keep], [basis[i] for i in keep]
    X = torch.stack(columns, dim=1)
    sol = sparse_regression(X, values, n_folds=n_folds)
    keep = [i for i, a in enumerate(sol.coefficients) if a != 0]
    # Constant first, then in basis order: a stable order for golden files.
    return SparseFormula(
        basis=tuple(basis[i] for i in keep),
        coefficients=tuple(float(sol.coefficients[i]) for i in keep),
        explained=sol.explained,
    )


# -------------------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Gate:
    """A gated coefficient along the trajectory: its features, its values, its sparse formula."""

    features: dict[str, tuple[float, ...]]
    values: tuple[float, ...]
    formula: SparseFormula | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": {k: list(v) for k, v in self.features.items()},
            "values": list(self.values),
            "formula": None if self.formula is None else self.formula.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        return cls(
            features={k: tuple(float(x) for x in v) for k, v in d["features"].items()},
            values=tuple(float(x) for x in d["values"]),
            formula=None if d.get("formula") is None else SparseFormula.from_dict(d["formula"]),
        )


def _edge_label(name: str) -> str:
    return f"{name} (change at lr S = 2)"


@dataclass(frozen=True)
class TermSummary:
    """One row of the report: a candidate term, its share of the gap, coefficient and approximation.

    ``coefficient`` is the fitted constant, or for a gated term its mean along the trajectory
    (``gate`` then holds the function). ``uncertainty`` is the fit's standard error where it
    reports one (the coefficient is then printed to the precision of the uncertainty's second
    significant figure); ``theory`` the value theory predicts for this physics (None if unknown).
    ``regime`` is ``"edge"`` for the change of a baseline-gated term's coefficient at ``lr S = 2``
    (the term itself, with its baseline coefficient, is a row of its own), ``"hidden"`` for a term of a flow's
    extra-state equation or its drift coupling (the physics has the term; the row is its fitted coefficient);
    None otherwise.
    """

    name: str
    share: float
    coefficient: float
    uncertainty: float | None = None
    theory: float | None = None
    approximation: Approximation | None = None
    gate: Gate | None = None
    regime: str | None = None

    @property
    def label(self) -> str:
        """The row's name: the term, or ``"Hg (change at lr S = 2)"`` for an edge row."""
        return _edge_label(self.name) if self.regime == "edge" else self.name

    def coefficient_text(self, digits: int = 3) -> str:
        if self.gate is not None and self.gate.formula is not None and self.gate.formula.explained >= 0.5:
            return f"{self.gate.formula.text(digits)} (explains {_percent(self.gate.formula.explained)})"
        if self.gate is not None:
            return f"mean {sig(self.coefficient, digits)}"
        unc = self.uncertainty
        if unc is None or not math.isfinite(unc) or unc <= 0:
            return sig(self.coefficient, digits)
        # Physics convention: the value to the precision of the uncertainty's second significant figure.
        decimals = min(max(1 - math.floor(math.log10(unc)), 0), 12)
        if abs(self.coefficient) >= 1e-3 and abs(self.coefficient) < 1e6 and decimals <= 8:
            return f"{self.coefficient:.{decimals}f} +- {unc:.{decimals}f}"
        return f"{sig(self.coefficient, digits)} +- {sig(unc, 2)}"

    def coefficient_latex(self, digits: int = 3) -> str:
        if self.gate is not None:
            if self.gate.formula is not None and self.gate.formula.explained >= 0.9:
                return r"\left(" + self.gate.formula.latex(digits) + r"\right)"
            args = ",".join(_feature_latex(f) for f in self.gate.features)
            sub = _latex_escape(self.name) + (",edge" if self.regime == "edge" else "")
            return rf"c_{{\mathrm{{{sub}}}}}({args})"
        return _sig_latex(self.coefficient, digits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "share": self.share,
            "coefficient": self.coefficient,
            "uncertainty": self.uncertainty,
            "theory": self.theory,
            "approximation": None if self.approximation is None else self.approximation.to_dict(),
            "gate": None if self.gate is None else self.gate.to_dict(),
            "regime": self.regime,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TermSummary:
        approx = d.get("approximation")
        return cls(
            name=d["name"],
            share=float(d["share"]),
            coefficient=float(d["coefficient"]),
            uncertainty=None if d.get("uncertainty") is None else float(d["uncertainty"]),
            theory=None if d.get("theory") is None else float(d["theory"]),
            approximation=None if approx is None else Approximation(
                **{**approx, "revised_by": tuple(approx["revised_by"])}
            ),
            gate=None if d.get("gate") is None else Gate.from_dict(d["gate"]),
            regime=d.get("regime"),
        )


RESIDUAL = "residual (not in the library)"

_PANEL_LABELS = {
    "loss": "loss at window end",
    "sharpness": "sharpness at window end",
    "distance": "window error (normalised)",
}


@dataclass
class Report:
    """What a fitted correction says about the physics; see the module docstring for definitions.

    Build it with :func:`build_report` (or ``FitResult.report()``); render it with ``str()``,
    :meth:`to_markdown`, :meth:`to_latex`, ``_repr_html_`` (notebooks), :meth:`to_dict` (JSON) and
    :meth:`figures`. ``terms`` are ranked by share; ``residual`` is the share of a distilled
    network correction that the library cannot express (None for a library correction).

    Verdict (:attr:`verdict`): ``"negligible"`` when the physics error is at most ``negligible``
    (default 1e-8, a root-mean-square distance of 0.01 percent of the window displacement: the
    physics already explains the data, and shares of a gap at that level mean little); otherwise
    ``"revise"`` when the library terms close at least ``outside`` (default half) of the gap, with
    a suggestion for every approximation whose terms' shares add up to at least ``min_share``;
    otherwise ``"hidden-state"`` when the hidden-state diagnostic fired (windows from nearly the same state need
    opposite corrections, :func:`neuralflow.hidden_report.hidden_state_evidence`: the missing physics depends on
    history), else ``"outside"``: the missing physics is outside the library. A fired diagnostic also ranks its
    approximation (the quasi-static account of the oscillation) first among the revisions, whatever the verdict.

    ``curves`` maps a panel (``loss``, ``sharpness``, ``distance``) to series ``step``,
    ``observed``, ``physics``, ``hybrid`` for :meth:`figures`; ``contributions`` maps ``step`` and
    each term's name to ``|C_i|`` at the sampled states.
    """

    problem: str
    lr: float
    physics: str
    physics_error: float
    hybrid_error: float
    terms: list[TermSummary]
    residual: float | None = None
    source: str = "library"
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    contributions: dict[str, list[float]] = field(default_factory=dict)
    negligible: float = 1e-8
    outside: float = 0.5
    min_share: float = 0.05
    notes: list[str] = field(default_factory=list)
    extra_equation: dict[str, Any] | None = None  # a hidden-state fit's equations (hidden_report.extra_equation)
    hidden_state: Any = None  # the hidden-state diagnostic's HiddenStateEvidence (JSON keeps it where it fired)

    def __post_init__(self) -> None:
        self.terms = sorted(self.terms, key=lambda t: -t.share)

    # --------------------------------------------------------------------------------------- numbers
    @property
    def closed(self) -> float:
        """Fraction of the physics' error the correction closed, ``1 - E_h / E_p`` in ``[0, 1]``."""
        if not self.physics_error > 0:
            return 0.0
        return float(min(max(1.0 - self.hybrid_error / self.physics_error, 0.0), 1.0))

    @property
    def unexplained(self) -> float:
        """Fraction of the gap the hybrid still misses, ``1 - closed``."""
        return 1.0 - self.closed

    @property
    def explained(self) -> float:
        """Fraction of the gap closed by library terms (a distilled network's residual excluded)."""
        return self.closed - (self.residual or 0.0)

    @property
    def verdict(self) -> str:
        """``"negligible"``, ``"revise"``, ``"hidden-state"`` (a hidden state is missing) or ``"outside"`` (the
        missing physics is outside the library)."""
        if self.physics_error <= self.negligible:
            return "negligible"
        if self.explained >= self.outside:
            return "revise"
        return "hidden-state" if self._history_dependent else "outside"

    @property
    def _history_dependent(self) -> bool:
        return self.hidden_state is not None and self.hidden_state.fired and self.physics_error > self.negligible

    def revisions(self) -> list[tuple[Approximation | None, float, list[TermSummary]]]:
        """The approximations to revise, ranked: ``(approximation, summed share, its rows)``.

        Rows that repair the same approximation are grouped and their shares added; a row that no
        approximation of the physics names stands alone (approximation None). A fired hidden-state diagnostic
        puts its approximation first, with the unexplained part as its share and no rows.
        """
        groups: dict[Any, list[TermSummary]] = {}
        for term in self.terms:
            key = term.approximation.name if term.approximation is not None else id(term)
            groups.setdefault(key, []).append(term)
        ranked = [(rows[0].approximation, sum(t.share for t in rows), rows) for rows in groups.values()]
        history = [(self.hidden_state.approximation, self.unexplained, [])] if self._history_dependent else []
        return history + sorted(ranked, key=lambda r: -r[1])

    def _term_suggestions(self) -> list[str]:
        """One suggestion per approximation whose rows' shares add up to at least ``min_share``."""
        out = []
        for approx, share, rows in self.revisions():
            if share < self.min_share or not rows:  # the hidden-state revision has its own statement
                continue
            # leave out a term that closes nothing (e.g. a gate that stayed shut) unless it is alone
            what = " and ".join(self._change_text(t) for t in rows if abs(t.share) >= 5e-4 or len(rows) == 1)
            closes = f"closes {100 * share:.1f} percent of the gap"
            if approx is None:
                out.append(f"{what} {closes} (no approximation of the {self.physics} physics names this term)")
            else:
                out.append(f'revise "{approx.statement.rstrip(".")}" [{approx.name}]: {what} {closes}')
        return out

    @staticmethod
    def _change_text(term: TermSummary) -> str:
        coef = term.coefficient_text()
        if term.theory is not None:
            coef += f" (theory {theory_text(term.theory)})"
        if term.regime == "edge":
            return f"changing the coefficient of {term.name} at lr S = 2 by {coef}"
        if term.regime == "hidden":
            return f"giving {term.name} the coefficient {coef}"
        return f"adding {term.name} with coefficient {coef}"

    def suggestions(self) -> list[str]:
        """Ranked plain-word suggestions, one per approximation, then the outside-the-library statement if it applies.

        A negligible physics error gives that statement alone: the shares of a gap at round-off
        level mean nothing.
        """
        if self.verdict == "negligible":
            return [f"The correction is negligible: the physics ({self.physics}) already explains the data to "
                    f"{sig(100 * math.sqrt(max(self.physics_error, 0.0)), 2)} percent (root-mean-square distance to "
                    "the targets relative to their displacement over a window)."]
        out = self._term_suggestions()
        if self._history_dependent:
            out.insert(0, self.hidden_state.text())
        if self.verdict == "outside":
            if out:
                head = (f"The library explains only {100 * max(self.explained, 0.0):.1f} percent of the gap; the "
                        "rest of the missing physics is outside the library")
            else:
                head = "No candidate term explains the gap; the missing physics is outside the library"
            worse = "" if self.hybrid_error < self.physics_error else (
                f"; the fitted terms do not help on the evaluated windows (hybrid error {sig(self.hybrid_error, 2)})")
            out.append(f"{head} (physics error {sig(self.physics_error, 2)}, "
                       f"{_percent(self.unexplained)} unexplained{worse}).")
        if self.residual is not None and self.residual >= self.min_share:
            out.append(f"{100 * self.residual:.1f} percent of the gap is closed by the network but cannot be "
                       "expressed by the library")
        if self.verdict == "revise" and self.unexplained >= 0.2:
            out.append(f"{100 * self.unexplained:.1f} percent of the gap remains unexplained by the correction")
        return out

    # -------------------------------------------------------------------------------------- table rows
    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for rank, t in enumerate(self.terms, 1):
            approx = t.approximation.name if t.approximation is not None else "-"
            rows.append((str(rank), t.label, _percent(t.share), t.coefficient_text(), theory_text(t.theory), approx))
        if self.residual is not None:
            rows.append(("", RESIDUAL, _percent(self.residual), "", "", "outside the library"))
        rows.append(("", "unexplained", _percent(self.unexplained), "", "", ""))
        return rows

    _HEADER = ("rank", "term", "share", "coefficient", "theory", "approximation to revise")

    def _title(self) -> str:
        return (f"neuralflow report: {self.physics} physics + {self.source} correction on {self.problem}, "
                f"lr = {sig(self.lr, 4)}")

    def _error_line(self) -> str:
        return (f"physics error {sig(self.physics_error)}, hybrid error {sig(self.hybrid_error)}: "
                f"the correction closed {_percent(self.closed)} of the gap")

    def __repr__(self) -> str:
        top = f"{self.terms[0].label} {_percent(self.terms[0].share)}" if self.terms else "-"
        return (f"Report(physics={self.physics!r}, problem={self.problem!r}, verdict={self.verdict!r}, "
                f"closed={_percent(self.closed)}, top={top!r})")

    def __str__(self) -> str:
        out = [self._title(), self._error_line(), "", *_fixed_width(self._HEADER, self._rows())]
        if self.extra_equation is not None:
            from .hidden_report import equation_text

            out += ["", "fitted equations:", *(f"  {line}" for line in equation_text(self.extra_equation))]
        out += ["", "suggestions:"] + [f"  {i}. {s}" for i, s in enumerate(self.suggestions(), 1)]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_markdown(self) -> str:
        """The report as Markdown: title, errors, the ranked table, suggestions, the corrected ODE."""
        out = [f"### {self._title()}", "", self._error_line() + ".", "", *_markdown_table(self._HEADER, self._rows())]
        out += ["", "**Suggestions**", ""] + [f"{i}. {s}" for i, s in enumerate(self.suggestions(), 1)]
        out += ["", "**Corrected ODE**", "", "$$" + self.equation() + "$$"]
        out += [f"\n*Note: {n}*" for n in self.notes]
        return "\n".join(out) + "\n"

    def equation(self, digits: int = 3) -> str:
        """The corrected ODE as bare LaTeX math (parses with matplotlib's mathtext); for a hidden-state fit the
        equations of ``theta`` and of the extra state, side by side."""
        if self.extra_equation is not None:
            from .hidden_report import equation_latex

            return equation_latex(self.extra_equation)
        rhs = PHYSICS_LATEX.get(self.physics, r"F_{\mathrm{" + _latex_escape(self.physics) + "}}(\theta)")
        changes = {t.name: t.coefficient_latex(digits) for t in self.terms if t.regime == "edge"}
        for t in self.terms:
            if t.regime == "edge":
                continue  # joined to its term's baseline: (c_0 + change) F
            coef = t.coefficient_latex(digits)
            if t.name in changes:
                change = changes[t.name]
                coef = r"\left(" + coef + ("" if change.startswith("-") else "+") + change + r"\right)"
            if coef.startswith("-"):
                rhs += coef + r"\," + _term_latex(t.name)
            else:
                rhs += "+" + coef + r"\," + _term_latex(t.name)
        if self.residual is not None:
            rhs += r"+R(\theta)"
        return r"\frac{d\theta}{dt}=" + rhs

    def to_latex(self) -> str:
        """The corrected ODE as a LaTeX ``equation`` (coefficients to 3 significant figures)."""
        return "\\begin{equation}\n" + self.equation() + "\n\\end{equation}\n"

    def _repr_html_(self) -> str:
        e = html.escape
        sugg = "".join(f"<li>{e(s)}</li>" for s in self.suggestions())
        notes = "".join(f"<p><em>note: {e(n)}</em></p>" for n in self.notes)
        return (f"<div><h4>{e(self._title())}</h4><p>{e(self._error_line())}</p>"
                f"{html_table(self._HEADER, self._rows())}"
                f"<p><b>Suggestions</b></p><ol>{sugg}</ol><p>${e(self.equation())}$</p>{notes}</div>")

    def to_frame(self) -> Any:
        """One row per term, in rank order, as a pandas DataFrame (needs pandas).

        Columns: ``term`` (the label, ``Hg (change at lr S = 2)`` for a baseline-gated change), ``name``,
        ``share``, ``coefficient`` (mean for a gated one), ``uncertainty``, ``theory``, ``approximation``
        (the slug to revise) and ``formula`` (a gate's sparse formula, else empty).
        """
        rows = [{
            "term": t.label, "name": t.name, "share": t.share, "coefficient": t.coefficient,
            "uncertainty": t.uncertainty, "theory": t.theory,
            "approximation": None if t.approximation is None else t.approximation.name,
            "formula": "" if t.gate is None or t.gate.formula is None else t.gate.formula.text(),
        } for t in self.terms]
        return data_frame(rows, columns=["term", "name", "share", "coefficient", "uncertainty", "theory",
                                         "approximation", "formula"]).set_index("term")

    def to_dict(self) -> dict[str, Any]:
        """Every number of the report, JSON-able (what checkpoints store); inverse :meth:`from_dict`."""
        return {
            "problem": self.problem,
            "lr": self.lr,
            "physics": self.physics,
            "source": self.source,
            "physics_error": self.physics_error,
            "hybrid_error": self.hybrid_error,
            "closed": self.closed,
            "unexplained": self.unexplained,
            "residual": self.residual,
            "verdict": self.verdict,
            "terms": [t.to_dict() for t in self.terms],
            "suggestions": self.suggestions(),
            "equation": self.equation(),
            "curves": self.curves,
            "contributions": self.contributions,
            "settings": {"negligible": self.negligible, "outside": self.outside, "min_share": self.min_share},
            "notes": self.notes,
            **({} if self.extra_equation is None else {"extra_equation": self.extra_equation}),
            **({"hidden_state": self.hidden_state.to_dict()} if self._history_dependent else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        from .hidden_report import HiddenStateEvidence

        settings = d.get("settings", {})
        return cls(
            problem=d["problem"],
            lr=float(d["lr"]),
            physics=d["physics"],
            physics_error=float(d["physics_error"]),
            hybrid_error=float(d["hybrid_error"]),
            terms=[TermSummary.from_dict(t) for t in d["terms"]],
            residual=None if d.get("residual") is None else float(d["residual"]),
            source=d.get("source", "library"),
            curves={panel: {k: [float(x) for x in v] for k, v in series.items()}
                    for panel, series in d.get("curves", {}).items()},
            contributions={k: [float(x) for x in v] for k, v in d.get("contributions", {}).items()},
            notes=list(d.get("notes", [])),
            extra_equation=d.get("extra_equation"),
            hidden_state=None if d.get("hidden_state") is None else HiddenStateEvidence.from_dict(d["hidden_state"]),
            **{k: float(v) for k, v in settings.items()},
        )

    # ----------------------------------------------------------------------------------------- figures
    def figures(self) -> dict[str, Any]:
        """Matplotlib figures (returned, never shown).

        ``"dynamics"``: observed versus physics versus hybrid (loss, sharpness, distance to the
        targets) over time; ``"contributions"``: each term's contribution ``|C_i|`` over time;
        ``"gates"`` (when a term is gated): each gated coefficient against its features, with its
        sparse formula.
        """
        import matplotlib.pyplot as plt

        figs: dict[str, Any] = {}
        panels = [p for p in ("loss", "sharpness", "distance") if "step" in self.curves.get(p, {})]
        if panels:
            fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
            for ax, panel in zip(axes[:, 0], panels):
                series = {k: np.asarray(v, dtype=float) for k, v in self.curves[panel].items()}
                for who, style in (("observed", "k.-"), ("physics", "C0.--"), ("hybrid", "C3.-")):
                    if who in series:
                        ok = np.isfinite(series[who])
                        ax.plot(series["step"][ok], series[who][ok], style, lw=1, ms=3, label=who)
                if panel == "sharpness":
                    ax.axhline(2 / self.lr, color="0.5", ls=":", lw=1, label="2 / lr")
                values = np.concatenate([v for k, v in series.items() if k != "step"])
                if panel != "sharpness" and len(values) and np.nanmin(values) > 0:
                    ax.set_yscale("log")
                ax.set_ylabel(_PANEL_LABELS[panel])
                ax.legend(fontsize="small", loc="upper right")
            axes[-1, 0].set_xlabel("step")
            axes[0, 0].set_title(f"{self.physics} physics + correction, lr = {sig(self.lr, 4)}")
            fig.set_layout_engine("constrained")
            figs["dynamics"] = fig
        if "step" in self.contributions:
            fig, ax = plt.subplots(figsize=(7, 3))
            step = np.asarray(self.contributions["step"])
            for name, v in self.contributions.items():
                if name != "step":
                    ax.plot(step, np.abs(np.asarray(v)), lw=1, label=name)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("|contribution|")
            ax.set_title("each term's contribution to dtheta/dt")
            ax.legend(fontsize="small", loc="upper right")
            fig.set_layout_engine("constrained")
            figs["contributions"] = fig
        gated = [t for t in self.terms if t.gate is not None]
        if gated:
            nf = max(len(t.gate.features) for t in gated)
            fig, axes = plt.subplots(len(gated), nf, figsize=(3.6 * nf, 2.8 * len(gated)), squeeze=False)
            for row, t in zip(axes, gated):
                vals = np.asarray(t.gate.values)
                fitted = self._formula_values(t.gate)
                for ax, (fname, x) in zip(row, t.gate.features.items()):
                    x = np.asarray(x)
                    ax.plot(x, vals, ".", ms=3, label=f"c_{t.label} (fitted)")
                    if fitted is not None:
                        order = np.argsort(x)
                        label = f"{t.gate.formula.text()} ({_percent(t.gate.formula.explained)})"
                        ax.plot(x[order], fitted[order], "C3-", lw=1, label="\n".join(textwrap.wrap(label, 40)))
                    if t.theory is not None:
                        ax.axhline(t.theory, color="0.5", ls=":", lw=1, label="theory")
                    knot = _feature_knot(fname)
                    if knot is not None:
                        ax.axvline(knot, color="0.7", ls="--", lw=1)
                    ax.set_xlabel(_feature_text(fname))
                    ax.set_ylabel(f"c_{t.label}")
                    ax.legend(fontsize="x-small", loc="upper right")
                for ax in row[len(t.gate.features):]:
                    ax.axis("off")
            fig.set_layout_engine("constrained")
            figs["gates"] = fig
        return figs

    @staticmethod
    def _formula_values(gate: Gate) -> np.ndarray | None:
        if gate.formula is None:
            return None
        n = len(gate.values)
        total = np.zeros(n)
        for (kind, fname, knot), a in zip(gate.formula.basis, gate.formula.coefficients):
            x = np.asarray(gate.features.get(fname, np.zeros(n)), dtype=float)
            on = np.asarray(gate.features.get("lr_S_minus_2", np.zeros(n)), dtype=float) > 0
            phi = {"1": np.ones(n), "x": x, "x2": x * x, "relu": np.maximum(x - knot, 0),
                   "step": (x > knot).astype(float), "xon": x * on}[kind]
            total += a * phi
        return total

    def save_figures(self, directory: str | Path, fmt: str = "png") -> list[Path]:
        """Write every figure of :meth:`figures` to ``directory/report_<name>.<fmt>``; returns the paths."""
        import matplotlib.pyplot as plt

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, fig in self.figures().items():
            path = directory / f"report_{name}.{fmt}"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
        return paths


# --------------------------------------------------------------------------------- from tensors to shares


def shares(contributions: dict[str, Tensor], closed: float) -> dict[str, float]:
    """Each term's share of the gap: ``closed * <C_i, C> / <C, C>``, summed over the states.

    ``contributions`` maps a name to ``C_i`` of shape ``(B, d)`` along the trajectory; ``C`` is
    their sum. The shares add up to ``closed`` (exactly, up to rounding), the rest is unexplained.
    """
    if not contributions:
        return {}
    total = sum(contributions.values())
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
    return {n: float(c) for n, c in zip(names, sol.coefficients)}, sol


# ------------------------------------------------------------------------------------ from a FitResult


def _spread(n: int, k: int, device: torch.device) -> Tensor:
    """At most ``k`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long().unique()


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-batch results along the states: tensors, dicts of them, dataclasses of them, None."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: _concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)})
    return torch.cat(parts)


def _in_batches(fn: Any, states: Tensor, batch: int) -> Any:
    """Apply ``fn`` to ``states`` in batches of ``batch`` and concatenate the results (:func:`_concat`)."""
    return _concat([fn(states[i : i + batch]) for i in range(0, len(states), batch)])


def _physics_view(flow: Any, name: str, spec: Any) -> tuple[Approximation | None, float | None]:
    """The approximation a term repairs and its theory value, relative to the physics ``flow``.

    The physics' own approximation that lists the term in ``revised_by`` comes first; otherwise
    the term's generic approximation. The term table's theory values hold relative to gradient
    flow, so they are shown for gradient physics and for physics that lists the term as missing;
    elsewhere only a theory value of 0 (as for ``g``) is shown, since the physics may
    already contain part of the term.
    """
    from .flows import GradientFlow

    own = next((a for a in getattr(flow, "approximations", ()) if name in a.revised_by), None)
    if spec is None:
        return own, None
    known = isinstance(flow, GradientFlow) or own is not None or spec.theory == 0
    return own or spec.approximation, spec.theory if known else None


def _edge_approximation(flow: Any) -> Approximation:
    """The approximation a coefficient's change at ``lr S = 2`` is attributed to.

    Below the edge the term repairs its own approximation (``Hg``: the continuous-time limit); what
    changes where GD starts to oscillate is the physics' account of the oscillation: its first
    approximation that the oscillation terms (``gradS``, ``gradScrit``) revise, for gradient flow
    "no oscillation"; or, for physics that lists none, "no oscillation in the critical subspace".
    """
    from .corrections import TERMS

    own = next((a for a in getattr(flow, "approximations", ())
                if {"gradS", "gradScrit"} & set(a.revised_by)), None)
    return own or TERMS["gradScrit"].approximation


def _window_shares(
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
    which = _spread(len(windows["step"]), max(1, max_states // 3), torch.device("cpu"))
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
    return {k: closed * float((gain * per_window(c * total) / norm2.clamp_min(1e-300)).sum() / gain.sum())
            for k, c in contribs.items()}


def _sharpness(problem: Any, states: Tensor) -> list[float]:
    from .autodiff import top_eigenpairs

    out, block = [], None
    for theta in states:
        res = top_eigenpairs(problem, theta, k=1, v0=block, tol=1e-3)
        block = res.block
        out.append(float(res.values[0]))
    return out


def _window_curves(
    result: Any, targets: Any, max_windows: int, sharpness: bool, notes: list[str]
) -> dict[str, dict[str, list]]:
    """Loss (and sharpness) at the ends of up to ``max_windows`` windows: targets, physics, hybrid.

    Each window starts at a target state (with the flow's measured extra state, for a flow that carries one) and
    is integrated over the fit's window with the fit's solver settings, as the fit itself does; the per-window
    errors come from the fit. A rollout that fails is left out, with a line in ``notes``.
    """
    from torchdiffeq import odeint

    from .hidden_report import ode_starts, solver_options

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
    start_ok = torch.nonzero(steps + window <= steps[-1]).flatten()
    if len(start_ok) == 0:
        return curves
    starts = start_ok[_spread(len(start_ok), max_windows, steps.device)]
    ends = torch.searchsorted(steps, steps[starts] + window)
    x = targets.iterates.to(device=problem.device, dtype=problem.dtype)
    t = torch.tensor([0.0, float(window)], dtype=problem.dtype, device=problem.device)
    kw = solver_options(result.settings)
    states = {"observed": x[ends]}
    with torch.no_grad():
        y0 = ode_starts(model, targets, starts)
        for who, rhs in (("physics", model.flow), ("hybrid", model)):
            try:
                states[who] = odeint(rhs, y0, t, **kw)[-1][:, : problem.dim]
            except NeuralflowError as err:  # e.g. a central flow started above 2/lr: leave that curve out
                notes.append(f"no {who} curve in the figures: {err}")
        end_steps = [int(s) for s in steps[ends]]
        curves["loss"] = {"step": end_steps, **{k: problem.batched_loss(v).tolist() for k, v in states.items()}}
    if sharpness:
        curves["sharpness"] = {"step": end_steps, **{k: _sharpness(problem, v) for k, v in states.items()}}
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
    the fitted equations (:mod:`neuralflow.hidden_report`). For a
    :class:`~neuralflow.corrections.TermLibrary`, ``hidden_state`` (default on) runs the hidden-state diagnostic
    (:func:`~neuralflow.hidden_report.hidden_state_evidence`, with its default settings).
    """
    from .corrections import TERMS, HiddenStateLibrary, Inspection, NeuralCorrection, TermLibrary

    model = result.model
    flow, corr = model.flow, model.correction
    if corr is None:
        raise InputError("build_report: this fit has no correction (physics alone); fit a Hybrid with a TermLibrary "
                         "or a NeuralCorrection to get a report.")
    problem = model.problem
    targets = result.trajectory  # the fit's targets: GD's iterates or their midpoint process
    verdict = {"negligible": negligible, "outside": outside, "min_share": min_share}
    if isinstance(corr, HiddenStateLibrary):
        return _hidden_state_report(result, max_windows, sharpness, verdict)
    idx = _spread(len(targets), max_states, targets.iterates.device)
    states = targets.iterates[idx].to(device=problem.device, dtype=problem.dtype)
    state_steps = [int(s) for s in targets.steps[idx]]
    physics_error, hybrid_error = float(result.physics_error), float(result.hybrid_error)
    closed = Report("", 1.0, "", physics_error, hybrid_error, []).closed
    notes: list[str] = []
    gates: dict[str, Gate] = {}
    uncertainty = dict(getattr(result, "uncertainty", {}) or {})
    edge: dict[str, float] = {}  # baseline-gated term -> its coefficient below the edge
    if isinstance(corr, TermLibrary):
        edge = {n: float(corr.gates[n].base.detach()) for n in corr.baseline}
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
            return rows_of(_in_batches(corr.inspect, at, batch))

        view = _in_batches(corr.inspect, states, batch)
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
                return _in_batches(lambda s: corr(t0, s), at, batch), _in_batches(library.fields, at, batch)

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
            f"{n_folds}-fold cross-validation); the library expresses {_percent(1 - sol.residual)} of the "
            "network's squared output"
        )
    else:
        raise InputError(f"build_report: cannot read a correction of type {type(corr).__name__}; expected a "
                         "TermLibrary, a NeuralCorrection or a HiddenStateLibrary.")
    share = _window_shares(result, targets, parts, closed, max_states, problem)
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
            rows.append(TermSummary(name, share.get(key, 0.0), float(values[key].mean()), None, None,
                                    _edge_approximation(flow), gates[key], regime="edge"))
    has_sharpness = bool(torch.isfinite(result.trajectory.sharpness).any())
    evidence = None
    if source == "library" and hidden_state and physics_error > negligible:
        from .hidden_report import hidden_state_evidence

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


def _hidden_state_report(result: Any, max_windows: int, sharpness: bool | None, verdict: dict[str, float]) -> Report:
    """The report of a fit whose correction is a HiddenStateLibrary (shares: :mod:`neuralflow.hidden_report`)."""
    from .corrections import HIDDEN_TERMS
    from .hidden_report import hidden_contributions, hidden_rows

    model = result.model
    flow = model.flow
    coefficients, share, equation = hidden_rows(result)
    notes = []
    if share is None:
        notes.append("no term's revision lowers the windows' error on its own; the shares are left at 0")
    if result.settings.get("extra_start") == "fitted":
        notes.append("shares are measured on windows started from the measured extra state, not the fitted starts")
    theory = {**{n: s.theory for n, s in HIDDEN_TERMS.items()}, "floor": flow.hidden_coefficients().get("floor")}
    uncertainty = dict(getattr(result, "uncertainty", {}) or {})
    rows = [TermSummary(n, (share or {}).get(n, 0.0), c, uncertainty.get(n), theory[n], HIDDEN_TERMS[n].approximation,
                        regime="hidden") for n, c in coefficients.items()]
    has_sharpness = bool(torch.isfinite(result.trajectory.sharpness).any())
    curves = _window_curves(result, result.trajectory, max_windows,
                            has_sharpness if sharpness is None else sharpness, notes)
    return Report(
        problem=str(result.trajectory.problem.get("name", model.problem.name)),
        lr=float(model.lr),
        physics=getattr(flow, "name", type(flow).__name__),
        physics_error=float(result.physics_error),
        hybrid_error=float(result.hybrid_error),
        terms=rows,
        source="hidden-state",
        curves=curves,
        contributions=hidden_contributions(result),
        notes=notes,
        extra_equation=equation,
        **verdict,
    )


# ------------------------------------------------------------------------------------------ the ladder


@dataclass
class Ladder:
    """One correction library fitted on several physics models: the gap shrinking as physics improves.

    ``reports`` are in the order of the physics given to :func:`ladder`, with the ``FitResult`` of
    each rung in ``results`` (not part of :meth:`to_dict`; empty for a ladder read back from JSON).
    Each rung shows the physics error, the gap left relative to the first rung's physics error,
    the hybrid error, the fraction the correction closed, its top revision (the approximation
    with the largest summed share, and its terms) and the unexplained part.
    """

    reports: list[Report]
    results: list[Any] = field(default_factory=list, repr=False, compare=False)

    _HEADER = ("physics", "physics error", "gap vs first", "hybrid error", "closed", "top revision", "unexplained")

    def _rows(self) -> list[tuple[str, ...]]:
        first = self.reports[0].physics_error if self.reports else math.nan
        rows = []
        for r in self.reports:
            revisions = r.revisions()
            top_text = "-"
            if revisions:
                approx, share, terms = revisions[0]
                name = approx.name if approx is not None else terms[0].label
                what = ", ".join(t.label for t in terms) if terms else "a hidden state is missing"
                top_text = f"{name} {_percent(share)} ({what})"
            gap = r.physics_error / first if first > 0 else math.nan
            rows.append((r.physics, sig(r.physics_error), _percent(gap), sig(r.hybrid_error), _percent(r.closed),
                         top_text, _percent(r.unexplained)))
        return rows

    def __repr__(self) -> str:
        return f"Ladder({', '.join(repr(r) for r in self.reports)})"

    def __str__(self) -> str:
        lr = sig(self.reports[0].lr, 4) if self.reports else "-"
        out = [f"neuralflow ladder: one correction library on each physics, lr = {lr}", "",
               *_fixed_width(self._HEADER, self._rows())]
        if self.reports:
            out += ["", f"last rung ({self.reports[-1].physics}): " + " ".join(self.reports[-1].suggestions())]
        return "\n".join(out) + "\n"

    def to_markdown(self) -> str:
        return "\n".join(_markdown_table(self._HEADER, self._rows())) + "\n"

    def _repr_html_(self) -> str:
        return html_table(self._HEADER, self._rows())

    def to_dict(self) -> dict[str, Any]:
        return {"reports": [r.to_dict() for r in self.reports]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ladder:
        return cls([Report.from_dict(r) for r in d["reports"]])


def ladder(
    trajectory: Any,
    physics: Sequence[Any],
    terms: Sequence[str] = ("Hg",),
    gated: Sequence[str] | bool | None = None,
    features: Sequence[str] | None = None,
    baseline: Sequence[str] = (),
    report_options: dict[str, Any] | None = None,
    problem: Any = None,
    hidden_terms: Sequence[str] | None = None,
    **fit_kwargs: Any,
) -> Ladder:
    """Fit the same correction library on top of each physics flow and tabulate the gap.

    ``physics`` are flows built on the trajectory's problem (for example ``GradientFlow``,
    ``ModifiedFlow(order=1)``, ``CentralFlow``), or their names in ``flows.FLOWS`` (built on
    ``problem``, by default rebuilt from the trajectory's description), from the crudest to the
    most refined; each gets
    a ``TermLibrary(terms, gated, features, baseline)`` and is fitted with ``fit(model, trajectory,
    **fit_kwargs)``; ``report_options`` go to :func:`build_report`. This is the physicist's loop:
    observe, model, compare, revise, refit.

    A rung whose flow carries state beyond ``theta`` (the oscillation flow) gets a
    :class:`~neuralflow.corrections.HiddenStateLibrary` instead: ``hidden_terms``, by default those of the growth
    ``floquet``, the amplitude-dependent rate, the floor and the drift coupling that the flow supports
    (:func:`neuralflow.hidden_report.default_hidden_terms`). So gradient flow, central flow and oscillation flow
    give one table: each rung's gap, what its correction closed, its top revision.
    """
    from .corrections import HiddenStateLibrary, Hybrid, TermLibrary
    from .fit import fit
    from .flows import FLOWS, for_run
    from .problems import make

    if not physics:
        raise InputError("ladder: pass at least one physics flow, e.g. [GradientFlow(p, lr), CentralFlow(p, lr)].")
    reports, results = [], []
    for flow in physics:
        if isinstance(flow, str):
            if flow not in FLOWS:
                raise InputError(f"ladder: unknown physics {flow!r}; known flows are {sorted(FLOWS)}.")
            problem = make(trajectory.problem) if problem is None else problem
            flow = for_run(flow, problem, trajectory)
        if flow.extra_state is not None:
            from .hidden_report import default_hidden_terms

            chosen = default_hidden_terms(flow) if hidden_terms is None else list(hidden_terms)
            model = Hybrid(flow, HiddenStateLibrary(flow.problem, flow.lr, terms=chosen))
        else:
            lib_kw: dict[str, Any] = {"terms": list(terms), "gated": gated, "baseline": list(baseline)}
            if features is not None:
                lib_kw["features"] = list(features)
            model = Hybrid(flow, TermLibrary(flow.problem, flow.lr, **lib_kw))
        results.append(fit(model, trajectory, **fit_kwargs))
        reports.append(build_report(results[-1], **(report_options or {})))
    return Ladder(reports, results)
