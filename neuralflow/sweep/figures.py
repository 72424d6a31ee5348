"""The laws a sweep tests, drawn from its table: :func:`law_figure` and :func:`coefficient_figure`."""

from __future__ import annotations

from typing import Any

from ..corrections import TERMS
from ..errors import InputError


def law_figure(table: Any, lr: str = "lr") -> Any:
    """The edge-of-stability law across a sweep: EoS onset step and ``plateau / (2/lr)`` against ``lr``.

    One point per run, the mean over runs at each ``lr`` joined by a line; the second panel has the
    law's value 1 (Cohen et al. 2021: the sharpness rises to ``2/lr`` and hovers there). Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig, (ax_on, ax_pl) = plt.subplots(1, 2, figsize=(9, 3.6))
    ok = table[table["status"] == "ok"] if "status" in table else table
    for ax, column, label in ((ax_on, "eos_onset", "EoS onset (step)"), (ax_pl, "plateau_ratio", "plateau / (2/lr)")):
        ax.plot(ok[lr], ok[column], "o", alpha=0.5, ms=4)
        mean = ok.groupby(lr)[column].mean()
        ax.plot(mean.index, mean.values, "-", color="C0")
        ax.set_xlabel("lr")
        ax.set_ylabel(label)
    reached = ok["eos_onset"].notna()
    ax_on.set_title(f"{int(reached.sum())} of {len(ok)} runs reach 2/lr", fontsize="small")
    ax_on.set_xlim(ax_pl.get_xlim())
    ax_pl.axhline(1.0, color="k", ls="--", lw=1, label="2/lr")
    ax_pl.legend(loc="best", fontsize="small")
    fig.suptitle(f"edge of stability across {len(ok)} runs")
    fig.tight_layout()
    return fig


def coefficient_figure(table: Any, term: str, lr: str = "lr") -> Any:
    """A fitted coefficient (``coef.<term>`` with error bars ``se.<term>``) against ``lr``, with theory."""
    import matplotlib.pyplot as plt

    if f"coef.{term}" not in table:
        raise InputError(f"coefficient_figure: the table has no fitted coefficient {term!r} (column coef.{term}).")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(table[lr], table[f"coef.{term}"], yerr=table[f"se.{term}"], fmt="o", ms=4, capsize=3, label="fitted")
    theory = TERMS[term].theory if term in TERMS else None
    if theory is not None:
        ax.axhline(theory, color="k", ls="--", lw=1, label=f"theory {theory:.4g}")
    ax.set_xlabel("lr")
    ax.set_ylabel(f"coefficient of {term}")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig
