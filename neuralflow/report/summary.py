"""One row of the report: a term's share, coefficient, theory value, approximation and gate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..flows import Approximation
from .formula import SparseFormula
from .notation import _feature_latex, _latex_escape, _sig_latex, percent, sig


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
    extra-state equation or of ``dtheta/dt`` beside it (the drift coupling, ``PHg``; the row is its fitted
    coefficient, the physics' own may be 0), ``"latent"`` for a path of a latent correction's states into
    ``dtheta/dt`` (a read-out field, whose ``gate`` holds ``(W z)_j`` along the windows, or the force ``Pz``);
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
            return f"{self.gate.formula.text(digits)} (explains {percent(self.gate.formula.explained)})"
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
            approximation=None
            if approx is None
            else Approximation(**{**approx, "revised_by": tuple(approx["revised_by"])}),
            gate=None if d.get("gate") is None else Gate.from_dict(d["gate"]),
            regime=d.get("regime"),
        )


RESIDUAL = "residual (not in the library)"
