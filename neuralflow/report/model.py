"""The :class:`Report`: plain numbers that render as text, Markdown, LaTeX, HTML, JSON and figures."""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._display import data_frame, html_table
from ..flows import Approximation
from .equations import equation_latex, equation_text
from .hidden import HiddenStateEvidence
from .notation import (
    _feature_knot,
    _feature_text,
    _latex_escape,
    _physics_latex,
    _term_latex,
    fixed_width,
    markdown_table,
    percent,
    sig,
    theory_text,
)
from .summary import RESIDUAL, Gate, TermSummary

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
    opposite corrections, :func:`neuralflow.report.hidden.hidden_state_evidence`: the missing physics depends on
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
    contributions: Mapping[str, Sequence[float]] = field(default_factory=dict)
    negligible: float = 1e-8
    outside: float = 0.5
    min_share: float = 0.05
    notes: list[str] = field(default_factory=list)
    extra_equation: dict[str, Any] | None = None  # a hidden-state fit's equations (equations.extra_equation)
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
        history: list[tuple[Approximation | None, float, list[TermSummary]]] = []
        if self.hidden_state is not None and self._history_dependent:
            history.append((self.hidden_state.approximation, self.unexplained, []))
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
        if term.regime == "latent" and term.gate is None:  # the latent force lr P z
            return f"the latent force P z (its size {sig(term.coefficient)} of the gradient step's)"
        if term.regime == "latent":
            return f"a latent coefficient of {term.name} ({coef})"
        return f"adding {term.name} with coefficient {coef}"

    def suggestions(self) -> list[str]:
        """Ranked plain-word suggestions, one per approximation, then the outside-the-library statement if it applies.

        A negligible physics error gives that statement alone: the shares of a gap at round-off
        level mean nothing.
        """
        if self.verdict == "negligible":
            return [
                f"The correction is negligible: the physics ({self.physics}) already explains the data to "
                f"{sig(100 * math.sqrt(max(self.physics_error, 0.0)), 2)} percent (root-mean-square distance to "
                "the targets relative to their displacement over a window)."
            ]
        out = self._term_suggestions()
        if self._history_dependent:
            out.insert(0, self.hidden_state.text())
        if self.source == "latent" and self.closed >= self.outside:
            out.insert(
                0,
                f"A hidden state is missing: latent states (their starts and their dynamics) close "
                f"{percent(self.closed)} of the gap (the rows say where they act; a coefficient that no formula of "
                "the state explains carries history).",
            )
        if self.verdict == "outside":
            if out:
                head = (
                    f"The library explains only {100 * max(self.explained, 0.0):.1f} percent of the gap; the "
                    "rest of the missing physics is outside the library"
                )
            else:
                head = "No candidate term explains the gap; the missing physics is outside the library"
            worse = (
                ""
                if self.hybrid_error < self.physics_error
                else (
                    "; the fitted terms do not help on the evaluated windows "
                    f"(hybrid error {sig(self.hybrid_error, 2)})"
                )
            )
            out.append(
                f"{head} (physics error {sig(self.physics_error, 2)}, {percent(self.unexplained)} unexplained{worse})."
            )
        if self.residual is not None and self.residual >= self.min_share:
            out.append(
                f"{100 * self.residual:.1f} percent of the gap is closed by the network but cannot be "
                "expressed by the library"
            )
        if self.verdict == "revise" and self.unexplained >= 0.2:
            out.append(f"{100 * self.unexplained:.1f} percent of the gap remains unexplained by the correction")
        return out

    # -------------------------------------------------------------------------------------- table rows
    def _rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = []
        for rank, t in enumerate(self.terms, 1):
            approx = t.approximation.name if t.approximation is not None else "-"
            rows.append((str(rank), t.label, percent(t.share), t.coefficient_text(), theory_text(t.theory), approx))
        if self.residual is not None:
            rows.append(("", RESIDUAL, percent(self.residual), "", "", "outside the library"))
        rows.append(("", "unexplained", percent(self.unexplained), "", "", ""))
        return rows

    _HEADER = ("rank", "term", "share", "coefficient", "theory", "approximation to revise")

    def title(self) -> str:
        return (
            f"neuralflow report: {self.physics} physics + {self.source} correction on {self.problem}, "
            f"lr = {sig(self.lr, 4)}"
        )

    def _error_line(self) -> str:
        return (
            f"physics error {sig(self.physics_error)}, hybrid error {sig(self.hybrid_error)}: "
            f"the correction closed {percent(self.closed)} of the gap"
        )

    def __repr__(self) -> str:
        top = f"{self.terms[0].label} {percent(self.terms[0].share)}" if self.terms else "-"
        return (
            f"Report(physics={self.physics!r}, problem={self.problem!r}, verdict={self.verdict!r}, "
            f"closed={percent(self.closed)}, top={top!r})"
        )

    def __str__(self) -> str:
        out = [self.title(), self._error_line(), "", *fixed_width(self._HEADER, self._rows())]
        if self.extra_equation is not None:
            if self.source == "latent":  # the physics' own coefficients, with the latent terms
                more, latent = self._latent_pieces(latex=False)
                lines = equation_text(self.extra_equation, more, latent)
                out += ["", "equations (the physics' own coefficients, with the latent terms):"]
            else:
                lines = equation_text(self.extra_equation)
                out += ["", "fitted equations:"]
            out += [f"  {line}" for line in lines]
        out += ["", "suggestions:"] + [f"  {i}. {s}" for i, s in enumerate(self.suggestions(), 1)]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_markdown(self) -> str:
        """The report as Markdown: title, errors, the ranked table, suggestions, the corrected ODE.

        Returns
        -------
        str
            Markdown text, with the corrected ODE in ``$$ ... $$``.
        """
        out = [f"### {self.title()}", "", self._error_line() + ".", "", *markdown_table(self._HEADER, self._rows())]
        out += ["", "**Suggestions**", ""] + [f"{i}. {s}" for i, s in enumerate(self.suggestions(), 1)]
        out += ["", "**Corrected ODE**", "", "$$" + self.equation() + "$$"]
        out += [f"\n*Note: {n}*" for n in self.notes]
        return "\n".join(out) + "\n"

    def _latent_pieces(self, latex: bool) -> tuple[str, str]:
        """A latent report's terms of ``dtheta/dt`` (``+ c_j(z) F_j``, ``+ lr P z``) and the latent equation."""
        if latex:
            more = "".join(
                r"+\eta\,Pz"
                if t.gate is None
                else r"+c_{\mathrm{" + _latex_escape(t.name) + r"}}(z)\," + _term_latex(t.name)
                for t in self.terms
            )
            return more, r"\frac{dz}{dt}=\eta\,f_{\phi}(\theta,z)"
        more = "".join(" + lr P z" if t.gate is None else f" + c_{t.name}(z) {t.name}" for t in self.terms)
        return more, "dz/dt = lr f_phi(theta, z)"

    def equation(self, digits: int = 3) -> str:
        """The corrected ODE as bare LaTeX math (parses with matplotlib's mathtext).

        Parameters
        ----------
        digits : int, default 3
            Significant figures of the coefficients.

        Returns
        -------
        str
            The right-hand side of ``dtheta/dt``; for a hidden-state fit the equations of ``theta`` and of the
            extra state, side by side.
        """
        if self.source == "latent":
            more, latent = self._latent_pieces(latex=True)
            if self.extra_equation is not None:  # the flow's own extra state beside the latent one
                return equation_latex(self.extra_equation, more, latent)
            return r"\frac{d\theta}{dt}=" + _physics_latex(self.physics) + more + r",\quad" + latent
        if self.extra_equation is not None:
            return equation_latex(self.extra_equation)
        rhs = _physics_latex(self.physics)
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
        """The corrected ODE as a LaTeX ``equation`` (coefficients to 3 significant figures).

        Returns
        -------
        str
            A ``\\begin{equation} ... \\end{equation}`` block.
        """
        return "\\begin{equation}\n" + self.equation() + "\n\\end{equation}\n"

    def _repr_html_(self) -> str:
        e = html.escape
        sugg = "".join(f"<li>{e(s)}</li>" for s in self.suggestions())
        notes = "".join(f"<p><em>note: {e(n)}</em></p>" for n in self.notes)
        return (
            f"<div><h4>{e(self.title())}</h4><p>{e(self._error_line())}</p>"
            f"{html_table(self._HEADER, self._rows())}"
            f"<p><b>Suggestions</b></p><ol>{sugg}</ol><p>${e(self.equation())}$</p>{notes}</div>"
        )

    def to_frame(self) -> Any:
        """One row per term, in rank order, as a pandas DataFrame (needs pandas).

        Columns: ``term`` (the label, ``Hg (change at lr S = 2)`` for a baseline-gated change), ``name``,
        ``share``, ``coefficient`` (mean for a gated one), ``uncertainty``, ``theory``, ``approximation``
        (the slug to revise) and ``formula`` (a gate's sparse formula, else empty).
        """
        rows = [
            {
                "term": t.label,
                "name": t.name,
                "share": t.share,
                "coefficient": t.coefficient,
                "uncertainty": t.uncertainty,
                "theory": t.theory,
                "approximation": None if t.approximation is None else t.approximation.name,
                "formula": "" if t.gate is None or t.gate.formula is None else t.gate.formula.text(),
            }
            for t in self.terms
        ]
        return data_frame(
            rows, columns=["term", "name", "share", "coefficient", "uncertainty", "theory", "approximation", "formula"]
        ).set_index("term")

    def to_dict(self) -> dict[str, Any]:
        """Every number of the report, JSON-able (what checkpoints store).

        Returns
        -------
        dict
            The report's fields, its verdict and derived shares; :meth:`from_dict` is the inverse.
        """
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
        """The report held by a dict from :meth:`to_dict` (as a checkpoint stores it).

        Parameters
        ----------
        d : dict
            The output of :meth:`to_dict`, possibly through JSON.

        Returns
        -------
        Report
            The same report (it renders as the original).
        """
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
            curves={
                panel: {k: [float(x) for x in v] for k, v in series.items()}
                for panel, series in d.get("curves", {}).items()
            },
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

        Returns
        -------
        dict of str to matplotlib.figure.Figure
            The figures by name. Needs matplotlib.
        """
        import matplotlib.pyplot as plt

        figs: dict[str, Any] = {}
        panels = [p for p in ("loss", "sharpness", "distance") if "step" in self.curves.get(p, {})]
        if panels:
            fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
            for ax, panel in zip(axes[:, 0], panels, strict=True):
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
        gated = [(t, t.gate) for t in self.terms if t.gate is not None]
        if gated:
            nf = max(len(gate.features) for _, gate in gated)
            fig, axes = plt.subplots(len(gated), nf, figsize=(3.6 * nf, 2.8 * len(gated)), squeeze=False)
            for row, (t, gate) in zip(axes, gated, strict=True):
                vals = np.asarray(gate.values)
                fitted = self._formula_values(gate)
                # a row has an axis per feature of the gate with the most; the spare ones are switched off below
                for ax, (fname, feature) in zip(row, gate.features.items(), strict=False):
                    x = np.asarray(feature)
                    ax.plot(x, vals, ".", ms=3, label=f"c_{t.label} (fitted)")
                    if fitted is not None and gate.formula is not None:
                        order = np.argsort(x)
                        label = f"{gate.formula.text()} ({percent(gate.formula.explained)})"
                        ax.plot(x[order], fitted[order], "C3-", lw=1, label="\n".join(textwrap.wrap(label, 40)))
                    if t.theory is not None:
                        ax.axhline(t.theory, color="0.5", ls=":", lw=1, label="theory")
                    knot = _feature_knot(fname)
                    if knot is not None:
                        ax.axvline(knot, color="0.7", ls="--", lw=1)
                    ax.set_xlabel(_feature_text(fname))
                    ax.set_ylabel(f"c_{t.label}")
                    ax.legend(fontsize="x-small", loc="upper right")
                for ax in row[len(gate.features) :]:
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
        for (kind, fname, knot), a in zip(gate.formula.basis, gate.formula.coefficients, strict=True):
            x = np.asarray(gate.features.get(fname, np.zeros(n)), dtype=float)
            on = np.asarray(gate.features.get("lr_S_minus_2", np.zeros(n)), dtype=float) > 0
            phi = {
                "1": np.ones(n),
                "x": x,
                "x2": x * x,
                "relu": np.maximum(x - knot, 0),
                "step": (x > knot).astype(float),
                "xon": x * on,
            }[kind]
            total += a * phi
        return total

    def save_figures(self, directory: str | Path, fmt: str = "png") -> list[Path]:
        """Write every figure of :meth:`figures` to ``directory/report_<name>.<fmt>``.

        Parameters
        ----------
        directory : str or Path
            The folder, made if missing.
        fmt : str, default "png"
            A matplotlib file format (``"png"``, ``"pdf"``, ``"svg"``, ...).

        Returns
        -------
        list of Path
            The files written. Needs matplotlib.
        """
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
