"""Sparse formulas for gated coefficients: a short sum of basis functions of the state features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..sparse import sparse_regression
from .notation import _feature_knot, _feature_latex, _feature_text, _sig_latex, sig

# ---------------------------------------------------------------------------------------- gated formula

_BASIS_TEXT = {
    "1": "1",
    "x": "({x})",
    "x2": "({x})^2",
    "relu": "relu({x})",
    "step": "step({x})",
    "xon": "({x}) step(lr S - 2)",
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
        for (kind, feature, knot), a in zip(self.basis, self.coefficients, strict=True):
            arg = self._argument(feature, knot if kind in ("relu", "step") else 0.0, latex)
            mag = number(abs(a), digits)
            term = mag if kind == "1" else mag + space + table[kind].format(x=arg)
            pieces.append(f"{'-' if a < 0 else '+'}{gap}{term}")
        if not pieces:
            return "0"
        joined = gap.join(pieces)
        return joined[1 + len(gap) :] if joined.startswith("+") else "-" + joined[1 + len(gap) :]

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
