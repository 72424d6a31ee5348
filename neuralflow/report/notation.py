"""Notation of the report: terms, features and physics as their registry entries write them; numbers and tables
as text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from ..corrections import FEATURES, TERMS
from ..flows import flow_latex

# ------------------------------------------------------------------------------------------------ notation
# Each term, feature and flow writes itself (TermSpec.latex, FeatureSpec.text/.latex/.edge, Flow.latex); a name
# outside the registries (a term or flow of a report from elsewhere) is written as F_name.


def _feature_text(name: str) -> str:
    spec = FEATURES.get(name)
    return spec.text if spec else name


def _feature_latex(name: str) -> str:
    spec = FEATURES.get(name)
    return spec.latex if spec else r"\mathrm{" + _latex_escape(name) + "}"


def _feature_knot(name: str) -> float | None:
    spec = FEATURES.get(name)
    return spec.edge if spec else None


def _latex_escape(text: str) -> str:
    return text.replace("\\", "").replace("_", r"\_").replace("{", "").replace("}", "").replace("%", r"\%")


def _term_latex(name: str) -> str:
    spec = TERMS.get(name)
    return spec.latex if spec else r"F_{\mathrm{" + _latex_escape(name) + "}}"


def _physics_latex(name: str) -> str:
    return flow_latex(name) or r"F_{\mathrm{" + _latex_escape(name) + r"}}(\theta)"


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


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def fixed_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A fixed-width text table: header, rule, rows."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda c: c.replace("|", r"\|")
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows),
    ]
