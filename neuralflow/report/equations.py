"""The fitted equations of a hidden-state correction, in text and LaTeX (a report's ``extra_equation``).

``dtheta/dt`` with its hidden-state terms (the drift coupling, ``PHg``) and the extra state's equation, each
coefficient the fitted one (else the physics' own), e.g. ``dX/dt = 2.03 (R X + X R)/2 + 1.1e-20 I``;
:mod:`neuralflow.report.hidden` reads them from a fit.
"""

from __future__ import annotations

from typing import Any

from ..corrections import HIDDEN_TERMS
from .notation import _latex_escape, _sig_latex, sig

__all__ = ["equation_text", "equation_latex", "extra_equation"]

#: The theta equation of a flow with extra state, without its hidden-state terms (text, LaTeX), by flow name.
_THETA_PHYSICS = {name: ("-lr g", r"-\eta\,g") for name in ("oscillation", "oscillation1")}  # order 1: with PHg

# ------------------------------------------------------------------------------------------ the equations


def _number(x: float, latex: bool) -> str:
    return _sig_latex(x) if latex else sig(x)


def _sum(pieces: list[tuple[float, str]], latex: bool, after: bool = False) -> str:
    """``c_1 F_1 + c_2 F_2 ...`` with the signs folded into the operators (``after``: it continues an expression);
    a unit field ``1`` is left out."""
    out = []
    for k, (c, field_) in enumerate(pieces):
        mag = _number(abs(c), latex)
        term = mag if field_ == "1" else mag + (r"\," if latex else " ") + field_
        first = k == 0 and not after
        if latex:
            out.append(("-" if c < 0 else "" if first else "+") + term)
        else:
            out.append(("-" if c < 0 else "") + term if first else (" - " if c < 0 else " + ") + term)
    return "".join(out) or "0"


def _notation(name: str, col: int) -> str:
    """Term ``name``'s unit field as its registry entry writes it: on the covariance (``col`` 0 text, 1 LaTeX) or per
    direction (2 text, 3 LaTeX)."""
    spec = HIDDEN_TERMS[name]
    return (spec.text, spec.latex, spec.direction_text, spec.direction_latex)[col]


def _lines(eq: dict[str, Any], latex: bool, more: str = "") -> tuple[str, str]:
    """The theta equation (``more`` appended to its right-hand side) and the extra state's equation of a report's
    ``extra_equation``."""
    symbol, matrix = eq["symbol"], eq["matrix"]
    col = (1 if latex else 0) + (0 if matrix else 2)
    physics = eq["physics"]
    theta_text, theta_latex = _THETA_PHYSICS.get(
        physics, (f"F_{physics}(theta)", r"F_{\mathrm{" + _latex_escape(physics) + r"}}(\theta)")
    )
    kind = {n: HIDDEN_TERMS[n].equation for n, _ in eq["terms"]}
    theta = [(-c, _notation(n, col).format(x=symbol)) for n, c in eq["terms"] if kind[n] == "theta"]
    extra = [(c, _notation(n, col).format(x=symbol)) for n, c in eq["terms"] if kind[n] == "extra"]
    rhs = (theta_latex if latex else theta_text) + (_sum(theta, latex, after=True) if theta else "") + more
    if latex:
        return r"\frac{d\theta}{dt}=" + rhs, rf"\frac{{d{symbol}}}{{dt}}=" + _sum(extra, True)
    return f"dtheta/dt = {rhs}", f"d{symbol}/dt = {_sum(extra, False)}"


def equation_text(eq: dict[str, Any], more: str = "", latent: str | None = None) -> list[str]:
    """The fitted equations in plain text: ``dtheta/dt`` (``more`` appended), the extra state's, ``latent`` (a latent
    correction's own equation, None without one), and what the symbols stand for."""
    theta, extra = _lines(eq, latex=False, more=more)
    symbol = eq["symbol"]
    where = []
    for n, _ in eq["terms"]:
        spec = HIDDEN_TERMS[n]
        stands_for = spec.where if eq["matrix"] else spec.direction_where
        if stands_for is not None:
            where.append(stands_for.format(x=symbol))
    lag = eq.get("lag", 0.0)  # absent from reports saved before the flow had a lag
    if lag:
        shift = f"{'-' if lag > 0 else '+'} {sig(abs(lag))}"
        where.append(
            f"{_notation('lag', 0)} {sig(lag)} steps ({symbol} {shift} d{symbol}/dt in the drift, R at r {shift} dr/dt)"
        )
    return [
        theta,
        extra,
        *([] if latent is None else [latent]),
        "where " + "; ".join([*where, f"{symbol}: {eq['statement']}"]),
    ]


def equation_latex(eq: dict[str, Any], more: str = "", latent: str | None = None) -> str:
    """The fitted equations as one line of LaTeX math (parses with matplotlib's mathtext); ``more`` and ``latent`` as
    in :func:`equation_text`."""
    theta, extra = _lines(eq, latex=True, more=more)
    lag = eq.get("lag", 0.0)  # the couplings' lag: X - tau dX/dt in the drift, r - tau dr/dt in R
    tail = "" if not lag else r",\quad " + _notation("lag", 1).format() + "=" + _number(lag, True)
    return theta + r",\quad " + extra + ("" if latent is None else r",\quad " + latent) + tail


def extra_equation(flow: Any, fitted: dict[str, float]) -> dict[str, Any]:
    """The data of the fitted equations: every hidden-state term the flow has or the library fitted, with its value
    (the fitted coefficient, else the physics' own), the extra state's symbol and what it is (JSON-able)."""
    own = flow.hidden_coefficients()
    terms = [
        [n, fitted.get(n, own[n])]
        for n in HIDDEN_TERMS
        if (n in fitted or own.get(n, 0) != 0) and HIDDEN_TERMS[n].equation != "lag"
    ]
    return {
        "physics": flow.name,
        "symbol": flow.extra_state.symbol,
        "statement": flow.extra_state.statement,
        "matrix": flow.extra_state.size > 1,
        "terms": terms,
        "lag": float(fitted.get("lag", own.get("lag", 0.0))),
    }
