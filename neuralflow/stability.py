"""How stable a report's conclusions are: the same fit repeated on resampled stretches of the trajectory.

A report's ranking and coefficients come from one fit to one trajectory. At the edge of stability
they can hinge on details (the oscillation grows from round-off, which differs between CPU kernel
paths), so a researcher needs to know which conclusions survive a perturbation of the data.
:func:`stability` splits the fitted span into ``blocks`` consecutive blocks of steps, and for each
of ``replicates`` draws keeps a random half of them (a delete-half block jackknife: whole blocks, so
the strong correlation between neighbouring steps stays inside a block; Shao and Tu, *The Jackknife
and Bootstrap*, 1995, 5.3), re-fits a copy of the model with the fit's own settings on the windows
that lie in the kept blocks, and builds its report. It counts how often each revision came out on
top and gives the spread of every coefficient and of the fraction of the gap closed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError, NeuralflowError
from .fit import FitResult, fit
from .problems import check_positive_int
from .report import build_report
from .trajectory import Trajectory

__all__ = ["Stability", "stability"]

# fit()'s settings that a re-fit repeats (the rest of FitResult.settings is bookkeeping)
_REFIT = (
    "window",
    "target",
    "method",
    "optimizer",
    "min_norm",
    "max_iters",
    "val_fraction",
    "stride",
    "patience",
    "tol",
    "init",
    "learning_rate",
    "seed",
    "solver",
    "step_size",
    "rtol",
    "atol",
    "balance",
)


@dataclass
class Stability:
    """The conclusions of re-fits on resampled blocks of the trajectory.

    ``top`` maps each conclusion (the top revision's approximation name, a term name when no
    approximation names it, or the verdict ``"outside"`` / ``"negligible"``) to the fraction of the
    re-fits in which it came out on top; ``original`` is the original report's. ``coefficients``
    and ``closed`` give the original value, the median and the 2.5 and 97.5 percentiles over the
    re-fits. ``failed`` counts the re-fits that raised an error (too few windows left, a solver failure);
    ``notes`` says which and why.
    """

    replicates: int
    blocks: int
    original: str
    top: dict[str, float]
    coefficients: dict[str, dict[str, float]]
    closed: dict[str, float]
    failed: int = 0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        done = self.replicates - self.failed
        lines = [
            f"Stability over {done} re-fits, each on a random half of the fitted span's {self.blocks} blocks of "
            f"steps" + (f" ({self.failed} failed)" if self.failed else "") + ":",
            f"  {'top conclusion':<40} on top in",
        ]
        for name, frac in sorted(self.top.items(), key=lambda kv: -kv[1]):
            mark = " (the report's)" if name == self.original else ""
            lines.append(f"  {name + mark:<40} {100 * frac:5.1f} percent")
        if self.original not in self.top:
            lines.append(f"  {self.original + ' (the report' + chr(39) + 's)':<40}   0.0 percent")
        lines.append(f"  {'coefficient':<14}{'original':>12}{'median':>12}   2.5 - 97.5 percent")
        for name, s in {**self.coefficients, "gap closed": self.closed}.items():
            lines.append(f"  {name:<14}{s['original']:>12.4g}{s['median']:>12.4g}   [{s['low']:.4g}, {s['high']:.4g}]")
        return "\n".join(lines + self.notes)


def _top(report: Any) -> str:
    """The report's top conclusion: the first revision's approximation (or term), or its verdict."""
    if report.verdict != "revise":
        return report.verdict
    approximation, _, rows = report.revisions()[0]
    return approximation.name if approximation is not None else rows[0].name


def _spread(original: float, values: list[float]) -> dict[str, float]:
    finite = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if not len(finite):
        return {"original": original, "median": math.nan, "low": math.nan, "high": math.nan}
    low, median, high = torch.quantile(finite, torch.tensor([0.025, 0.5, 0.975], dtype=torch.float64)).tolist()
    return {"original": original, "median": median, "low": low, "high": high}


def stability(
    result: FitResult,
    trajectory: Trajectory,
    replicates: int = 20,
    blocks: int = 8,
    seed: int = 0,
    **report_options: Any,
) -> Stability:
    """Re-fit ``result``'s model on ``replicates`` delete-half block resamples of ``trajectory``; see the module.

    Each re-fit starts from a copy of the fitted model, repeats the fit's own settings (its ``exclude`` kept)
    and leaves out a random half of the blocks; a re-fit that fails is counted, not raised.

    Parameters
    ----------
    result : FitResult
        The fit whose conclusions are tested.
    trajectory : Trajectory
        The trajectory passed to :func:`~neuralflow.fit.fit` (not ``result.trajectory``, which holds the
        fit's targets, smoothed if ``target="smoothed"``).
    replicates : int, default 20
        How many resampled re-fits.
    blocks : int, default 8
        Consecutive blocks of steps the fitted span is split into; each re-fit keeps half of them (at least 2).
    seed : int, default 0
        Seed of the blocks each re-fit leaves out.
    **report_options
        Keywords for :func:`~neuralflow.report.build_report`, for the original and every re-fit.

    Returns
    -------
    Stability
        How often each conclusion came out on top, and the spread of every coefficient and of the fraction
        of the gap closed; ``str()`` prints them.

    Raises
    ------
    InputError
        When ``result`` is not a ``FitResult``, ``trajectory`` not a ``Trajectory``, or ``replicates`` or
        ``blocks`` out of range.
    """
    if not isinstance(result, FitResult):
        raise InputError(f"stability: expected a FitResult, got {type(result).__name__}.")
    if not isinstance(trajectory, Trajectory):
        raise InputError(
            f"stability: trajectory must be the Trajectory that was fitted, got {type(trajectory).__name__}."
        )
    replicates = check_positive_int(replicates, "stability: replicates")
    blocks = check_positive_int(blocks, "stability: blocks")
    if blocks < 2:
        raise InputError("stability: blocks must be at least 2 (a re-fit keeps half of them).")
    settings = {k: result.settings[k] for k in _REFIT if k in result.settings}
    base_exclude = [tuple(r) for r in result.settings.get("exclude", [])]
    first, last = int(trajectory.steps[0]), int(trajectory.steps[-1]) + 1
    edges = torch.linspace(first, last, blocks + 1).round().long().tolist()
    original = build_report(result, **report_options)
    gen = torch.Generator().manual_seed(seed)
    tops: dict[str, int] = {}
    coefficients: dict[str, list[float]] = {name: [] for name in result.coefficients}
    closed: list[float] = []
    failed = 0
    notes: list[str] = []
    for _ in range(replicates):
        dropped = torch.randperm(blocks, generator=gen)[: blocks // 2].sort().values.tolist()
        exclude = base_exclude + [(edges[b], edges[b + 1]) for b in dropped]
        model = copy.deepcopy(result.model)
        try:
            refit = fit(model, trajectory, exclude=exclude, progress=False, **settings)
            report = build_report(refit, **report_options)
        except NeuralflowError as exc:
            failed += 1
            notes.append(f"  a re-fit without blocks {dropped} failed: {exc}")
            continue
        key = _top(report)
        tops[key] = tops.get(key, 0) + 1
        for name in coefficients:
            coefficients[name].append(refit.coefficients.get(name, math.nan))
        closed.append(report.closed)
    done = replicates - failed
    if done == 0:
        raise InputError(
            f"stability: every re-fit failed (e.g. too few windows in half of {blocks} blocks); use fewer blocks."
        )
    return Stability(
        replicates=replicates,
        blocks=blocks,
        original=_top(original),
        top={k: v / done for k, v in tops.items()},
        coefficients={n: _spread(result.coefficients[n], v) for n, v in coefficients.items()},
        closed=_spread(original.closed, closed),
        failed=failed,
        notes=notes,
    )
