"""The fitted equations of a hidden-state correction, in text and LaTeX (a report's ``extra_equation``).

``dtheta/dt`` with the drift coupling and the extra state's equation, each coefficient the fitted one (else the
physics' own), e.g. ``dX/dt = 2.03 (R X + X R)/2 + 1.1e-20 I``; :mod:`neuralflow.report.hidden` reads them from a
fit.
"""

from __future__ import annotations

from typing import Any

from .notation import _latex_escape, _sig_latex, sig

__all__ = ["HIDDEN_NOTATION", "equation_text", "equation_latex", "extra_equation"]

#: Each hidden-state term's unit field, ``(matrix text, matrix LaTeX, per-direction text, per-direction LaTeX)``;
#: ``{x}`` is the extra state's symbol. The drift is written without its sign: its field is ``-lr grad <H, Sigma>``.
HIDDEN_NOTATION: dict[str, tuple[str, str, str, str]] = {
    "floquet": ("(R {x} + {x} R)/2", r"\frac{{R{x}+{x}R}}{{2}}", "{x} log|1 - lr lambda|", r"{x}\log|1-\eta\lambda|"),
    "floquet_linear": ("(L {x} + {x} L)/2", r"\frac{{L{x}+{x}L}}{{2}}", "{x} (lr lambda - 2)", r"{x}\,(\eta\lambda-2)"),
    "amplitude": ("{x} {x}", "{x}^{{2}}", "{x}^2", "{x}^{{2}}"),
    "floor": ("I", "I", "1", "1"),
    "drift": (
        "lr grad <H, Sigma>",
        r"\eta\,\nabla\langle H,\Sigma\rangle",
        "lr grad <H, Sigma>",
        r"\eta\,\nabla\langle H,\Sigma\rangle",
    ),
}

#: What each matrix symbol stands for, printed under the equations when a term uses it.
_WHERE = {
    "floquet": "R = diag(log|1 - lr lambda_i|)",
    "floquet_linear": "L = diag(lr lambda_i - 2)",
    "drift": "Sigma = U^T X U over the tracked Hessian eigenvectors U",
}

#: The theta equation of a flow with extra state, without its hidden-state terms (text, LaTeX), by flow name.
_THETA_PHYSICS = {"oscillation": ("-lr g", r"-\eta\,g")}

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


def _lines(eq: dict[str, Any], latex: bool) -> tuple[str, str]:
    """The theta equation and the extra state's equation of a report's ``extra_equation``."""
    symbol, matrix = eq["symbol"], eq["matrix"]
    col = (1 if latex else 0) + (0 if matrix else 2)
    physics = eq["physics"]
    theta_text, theta_latex = _THETA_PHYSICS.get(
        physics, (f"F_{physics}(theta)", r"F_{\mathrm{" + _latex_escape(physics) + r"}}(\theta)")
    )
    theta = [(-c, HIDDEN_NOTATION[n][col]) for n, c in eq["terms"] if n == "drift"]
    extra = [(c, HIDDEN_NOTATION[n][col].format(x=symbol)) for n, c in eq["terms"] if n != "drift"]
    rhs = (theta_latex if latex else theta_text) + (_sum(theta, latex, after=True) if theta else "")
    if latex:
        return r"\frac{d\theta}{dt}=" + rhs, rf"\frac{{d{symbol}}}{{dt}}=" + _sum(extra, True)
    return f"dtheta/dt = {rhs}", f"d{symbol}/dt = {_sum(extra, False)}"


def equation_text(eq: dict[str, Any]) -> list[str]:
    """The fitted equations in plain text: ``dtheta/dt``, the extra state's, and what the symbols stand for."""
    theta, extra = _lines(eq, latex=False)
    symbol = eq["symbol"]
    where = [
        _WHERE[n] if eq["matrix"] else f"Sigma = {symbol} u u^T along the top Hessian eigenvector u"
        for n, _ in eq["terms"]
        if n in _WHERE and (eq["matrix"] or n == "drift")
    ]
    return [theta, extra, "where " + "; ".join([*where, f"{symbol}: {eq['statement']}"])]


def equation_latex(eq: dict[str, Any]) -> str:
    """The fitted equations as one line of LaTeX math (parses with matplotlib's mathtext)."""
    theta, extra = _lines(eq, latex=True)
    return theta + r",\quad " + extra


def extra_equation(flow: Any, fitted: dict[str, float]) -> dict[str, Any]:
    """The data of the fitted equations: every hidden-state term the flow has or the library fitted, with its value
    (the fitted coefficient, else the physics' own), the extra state's symbol and what it is (JSON-able)."""
    own = flow.hidden_coefficients()
    terms = [[n, fitted.get(n, own[n])] for n in HIDDEN_NOTATION if n in fitted or own.get(n, 0) != 0]
    return {
        "physics": flow.name,
        "symbol": flow.extra_state.symbol,
        "statement": flow.extra_state.statement,
        "matrix": flow.extra_state.size > 1,
        "terms": terms,
    }
