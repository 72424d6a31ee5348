"""One correction library fitted on several physics models: the gap shrinking as physics improves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._display import html_table
from .corrections import HiddenStateLibrary, Hybrid, TermLibrary
from .errors import InputError
from .fit import fit
from .flows import FLOWS, for_run
from .problems import make
from .report import Report, build_report
from .report.hidden import default_hidden_terms
from .report.notation import fixed_width, markdown_table, percent, sig

__all__ = ["Ladder", "ladder"]


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
        rows: list[tuple[str, ...]] = []
        for r in self.reports:
            revisions = r.revisions()
            top_text = "-"
            if revisions:
                approx, share, terms = revisions[0]
                name = approx.name if approx is not None else terms[0].label
                what = ", ".join(t.label for t in terms) if terms else "a hidden state is missing"
                top_text = f"{name} {percent(share)} ({what})"
            gap = r.physics_error / first if first > 0 else math.nan
            rows.append(
                (
                    r.physics,
                    sig(r.physics_error),
                    percent(gap),
                    sig(r.hybrid_error),
                    percent(r.closed),
                    top_text,
                    percent(r.unexplained),
                )
            )
        return rows

    def __repr__(self) -> str:
        return f"Ladder({', '.join(repr(r) for r in self.reports)})"

    def __str__(self) -> str:
        lr = sig(self.reports[0].lr, 4) if self.reports else "-"
        out = [
            f"neuralflow ladder: one correction library on each physics, lr = {lr}",
            "",
            *fixed_width(self._HEADER, self._rows()),
        ]
        if self.reports:
            out += ["", f"last rung ({self.reports[-1].physics}): " + " ".join(self.reports[-1].suggestions())]
        return "\n".join(out) + "\n"

    def to_markdown(self) -> str:
        return "\n".join(markdown_table(self._HEADER, self._rows())) + "\n"

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

    Each physics flow, from the crudest to the most refined, gets a ``TermLibrary(terms, gated, features,
    baseline)`` and is fitted with ``fit(model, trajectory, **fit_kwargs)``; its report is built with
    :func:`build_report`. This is the physicist's loop: observe, model, compare, revise, refit.

    A rung whose flow carries state beyond ``theta`` (the oscillation flow) gets a
    :class:`~neuralflow.corrections.HiddenStateLibrary` instead. So gradient flow, central flow and oscillation
    flow give one table: each rung's gap, what its correction closed, its top revision. The report of such a rung
    measures its gap over all the fit's windows (:mod:`neuralflow.report.hidden`), so a ladder with one fits every
    rung without held-out windows (``val_fraction=0``): every rung is then measured on the same windows.

    Parameters
    ----------
    trajectory : Trajectory
        The GD run every rung is fitted to.
    physics : sequence of Flow or str
        Flows built on the trajectory's problem (for example ``GradientFlow``, ``ModifiedFlow(order=1)``,
        ``CentralFlow``), or their names in ``flows.FLOWS`` (built on ``problem``); at least one.
    terms : sequence of str, default ("Hg",)
        The library's terms (:class:`~neuralflow.corrections.TermLibrary`).
    gated : sequence of str or bool, optional
        The library's gated terms.
    features : sequence of str, optional
        The gates' features; None: the library's default.
    baseline : sequence of str, default ()
        The gated terms with a learned constant below the edge.
    report_options : dict, optional
        Keywords for :func:`build_report`.
    problem : Problem, optional
        The problem flows given by name are built on; None: rebuilt from the trajectory's description.
    hidden_terms : sequence of str, optional
        The :class:`~neuralflow.corrections.HiddenStateLibrary` terms of a rung with extra state; None: those of
        the growth ``floquet``, the amplitude-dependent rate, the floor and the drift coupling that the flow
        supports (:func:`neuralflow.report.hidden.default_hidden_terms`).
    **fit_kwargs
        Options of :func:`neuralflow.fit.fit` (``window``, ``method``, ``max_iters``, ...), the same for every rung.

    Returns
    -------
    Ladder
        One :class:`Report` per rung (``reports``) and the fits (``results``); ``str()`` prints the table.

    Raises
    ------
    InputError
        Without physics, with an unknown flow name, or with ``val_fraction > 0`` and a rung with extra state.
    """
    if not physics:
        raise InputError("ladder: pass at least one physics flow, e.g. [GradientFlow(p, lr), CentralFlow(p, lr)].")
    flows = []
    for flow in physics:
        if isinstance(flow, str):
            if flow not in FLOWS:
                raise InputError(f"ladder: unknown physics {flow!r}; known flows are {sorted(FLOWS)}.")
            problem = make(trajectory.problem) if problem is None else problem
            flow = for_run(flow, problem, trajectory)
        flows.append(flow)
    if any(flow.extra_state is not None for flow in flows):
        if fit_kwargs.setdefault("val_fraction", 0.0) != 0:
            raise InputError(
                f"ladder: a rung with extra state ({', '.join(f.name for f in flows if f.extra_state is not None)}) "
                "is measured over all its windows, so every rung is fitted without held-out windows; drop "
                f"val_fraction={fit_kwargs['val_fraction']!r} (or pass val_fraction=0)."
            )
    reports, results = [], []
    for flow in flows:
        if flow.extra_state is not None:
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
