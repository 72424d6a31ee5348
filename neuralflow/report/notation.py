"""Notation of the report: LaTeX of terms, physics and features; numbers and tables as text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

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


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def fixed_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A fixed-width text table: header, rule, rows."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda c: c.replace("|", r"\|")
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows)]
