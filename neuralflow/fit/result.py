"""What a fit returns: :class:`FitResult`, and :class:`JointFitResult` for several runs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .._display import html_table
from ..corrections import Hybrid
from ..errors import InputError
from ..trajectory import Trajectory

if TYPE_CHECKING:
    from ..report import Report


@dataclass
class FitResult:
    """What :func:`fit` found.

    ``coefficients`` are dimensionless (the term table in the README; a gated coefficient is its mean over
    the window starts, for a baseline-gated term its baseline plus the mean change: the report shows the two
    apart) with ``uncertainty`` their standard errors: Gauss-Newton sandwich
    covariance clustered by window (the spread of the windows' estimating equations), mapped to
    the coefficients by the delta method; for ``method="regression"`` the ordinary least-squares
    error. Errors are normalised by the mean squared displacement (see :mod:`neuralflow.fit`);
    ``physics_error`` and ``hybrid_error`` are means over the validation windows (over the
    training windows when there are none). ``windows`` holds each window's start ``step``,
    whether it is a ``validation`` window and, for a fit with ``extra_start="fitted"``, each window's fitted
    start of the extra state (``extra_start``, ``(W, extra size)``).
    """

    model: Hybrid
    coefficients: dict[str, float]
    uncertainty: dict[str, float]
    history: list[dict[str, float]]
    window_errors: Tensor
    physics_window_errors: Tensor
    physics_error: float
    hybrid_error: float
    timing: dict[str, float]
    settings: dict[str, Any]
    trajectory: Trajectory
    n_function_evals: int
    windows: dict[str, Tensor] = field(default_factory=dict)
    normaliser: float = math.nan

    @property
    def improvement(self) -> float:
        """``physics_error / hybrid_error`` on the validation windows (> 1: the correction helps)."""
        return self.physics_error / self.hybrid_error if self.hybrid_error > 0 else math.inf

    def report(self, **options: Any) -> Report:
        """The readable report of this fit (:func:`neuralflow.report.build_report`; ``options`` go there)."""
        from ..report import build_report

        return build_report(self, **options)

    def save(self, path: str | os.PathLike, report: Report | bool = True) -> Path:
        """Write this fit to a checkpoint (:func:`neuralflow.checkpoint.save`); ``nf.load`` reads it back."""
        from ..checkpoint import save

        return save(self, path, report=report)

    def _repr_html_(self) -> str:
        settings = self.settings
        rows = [
            (name, f"{value:+.6g}", f"{self.uncertainty.get(name, math.nan):.2g}")
            for name, value in self.coefficients.items()
        ]
        caption = (
            f"fit of {settings.get('model', {}).get('flow', {}).get('name', 'physics')} + correction, "
            f"window {settings.get('window')}, {settings.get('method')}: error physics "
            f"{self.physics_error:.4g} -> hybrid {self.hybrid_error:.4g}, "
            f"{self.timing.get('total', math.nan):.3g} s"
        )
        return html_table(("term", "coefficient", "standard error"), rows, caption)

    def __repr__(self) -> str:
        unc = self.uncertainty
        coeffs = ", ".join(f"{k}={v:.4g}+-{unc.get(k, math.nan):.2g}" for k, v in self.coefficients.items())
        return (
            f"FitResult({coeffs}; error physics {self.physics_error:.4g} -> hybrid {self.hybrid_error:.4g}, "
            f"{len(self.history)} iterations, {self.timing.get('total', math.nan):.3g} s)"
        )


@dataclass
class JointFitResult(FitResult):
    """What :func:`fit` found on several runs at once (``nf.fit(model, [traj_a, traj_b, ...])``).

    The inherited fields describe the joint fit: ``coefficients`` and ``uncertainty`` are shared by every
    run (pure numbers: each term carries its own power of its run's ``lr``); ``physics_error`` and
    ``hybrid_error`` are means over the runs; the window arrays, ``trajectory`` and ``normaliser`` are
    those of the first run at the model's ``lr`` (else the first run). ``runs`` holds each run's view of
    the joint fit (its model at its ``lr``, sharing the coefficients), ``per_run`` an independent fit of
    each run with the same settings, and ``universality`` per term: ``universal``, the per-run ``values``
    and ``se``, each run's ``lr`` and truncation ``allowance``, and ``z``, the largest disagreement of two runs
    in combined errors (see :func:`fit_runs`).
    """

    runs: list[FitResult] = field(default_factory=list)
    per_run: list[FitResult] = field(default_factory=list)
    universality: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def universal(self) -> dict[str, bool]:
        """Per term: whether its coefficient is the same at every run's ``lr`` (see :func:`fit_runs`)."""
        return {name: u["universal"] for name, u in self.universality.items()}

    def universality_notes(self) -> list[str]:
        """One sentence per term: universal across the runs or not, with the numbers behind the verdict."""
        lrs = ", ".join(f"{r.trajectory.lr:g}" for r in self.runs)
        notes = []
        for name, u in self.universality.items():
            per_run = ", ".join(f"{v:.4g}" for v in u["values"])
            base = (
                f"{name} across {len(self.runs)} runs (lr {lrs}): joint {self.coefficients[name]:.4g} +- "
                f"{self.uncertainty[name]:.2g}, per run {per_run}; two runs disagree by at most {u['z']:.2g} "
                f"combined errors (per-run error and truncation allowance lr S, up to {max(u['allowance']):.2%})"
            )
            if u["universal"] is None:
                notes.append(
                    f"{base}: no verdict (no per-run fits, or lr S >= 1 in a run, where the series in lr "
                    "does not converge)."
                )
            elif u["universal"]:
                notes.append(f"{base}: universal.")
            else:
                notes.append(
                    f"{base}: NOT universal. Its per-run values depend on lr beyond the truncation of the "
                    "series: the term carries another power of lr, or a term the library lacks leaks into it."
                )
        return notes

    def report(self, **options: Any) -> Report:
        """The report of the joint fit (for the reference run), with one universality note per term."""
        rep = super().report(**options)
        rep.notes.extend(self.universality_notes())
        return rep

    def save(self, path: str | os.PathLike, report: Report | bool = True) -> Path:
        raise InputError("a joint fit is saved run by run: result.runs[i].save(path) writes run i's view of it.")

    def __repr__(self) -> str:
        verdict = ", ".join(f"{n}: {'universal' if u else 'not universal'}" for n, u in self.universal.items())
        return f"Joint{super().__repr__()[:-1]}; {len(self.runs)} runs; {verdict})"
