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
hidden-state diagnostic of a state-only correction are read by :mod:`neuralflow.report.hidden`.

The core (:class:`Report`) holds plain numbers only, so a report round-trips through JSON
(:meth:`Report.to_dict` / :meth:`Report.from_dict`) and renders without recomputing anything;
:func:`build_report` computes those numbers from a ``FitResult``, and :func:`ladder` fits one
library on several physics models and tabulates how the gap shrinks.
"""

from ..sparse import SparseSolution, sparse_regression
from .build import build_report, distill, shares  # noqa: F401 (importable from here as before)
from .formula import SparseFormula, gate_formula
from .model import Report
from .notation import sig, theory_text  # noqa: F401
from .summary import RESIDUAL, Gate, TermSummary  # noqa: F401

__all__ = [
    "Report",
    "TermSummary",
    "Gate",
    "SparseFormula",
    "SparseSolution",
    "sparse_regression",
    "gate_formula",
    "build_report",
]


def __getattr__(name: str) -> object:
    """``ladder`` and ``Ladder`` live in :mod:`neuralflow.ladder` (above fit and report); the old
    ``neuralflow.report.ladder`` path still works."""
    if name in ("ladder", "Ladder"):
        from ..ladder import Ladder, ladder

        return {"ladder": ladder, "Ladder": Ladder}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
