"""ODE solvers: one :class:`Solver` description used by ``simulate``, the fit and the report.

A solver is a torchdiffeq method with either a fixed step (``step_size``, in GD steps) or tolerances (``rtol``,
``atol``), in the spirit of diffrax's step-size controllers. It is validated once, when it is made; a flow states
its preferred one in ``flow.solver``, and :meth:`Solver.override` applies what a caller asks for on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ._validate import check_positive_finite
from .errors import InputError

__all__ = ["FIXED_GRID", "ADAPTIVE", "Solver"]

#: torchdiffeq's fixed-grid methods (they take ``options={"step_size": h}``).
FIXED_GRID = ("rk4", "euler", "midpoint", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams")
#: torchdiffeq's adaptive methods (they take ``rtol`` and ``atol``).
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass(frozen=True)
class Solver:
    """An ODE integrator: a torchdiffeq ``method`` with its fixed step or its tolerances.

    Validated once, when it is made; immutable (:meth:`override` makes a changed copy).

    Parameters
    ----------
    method : str, default "dopri5"
        A torchdiffeq method: one of :data:`FIXED_GRID` or :data:`ADAPTIVE`.
    step_size : float, optional
        The fixed grid's step, in GD steps; None: torchdiffeq's (one step per output time). Unused by an
        adaptive method.
    rtol : float, default 1e-7
        The relative tolerance of an adaptive method.
    atol : float, default 1e-9
        The absolute tolerance of an adaptive method.

    Raises
    ------
    InputError
        On an unknown method, or a step size or tolerance that is not positive and finite.

    Examples
    --------
    >>> from neuralflow.solvers import Solver
    >>> Solver("rk4", step_size=0.5).odeint_options()
    {'method': 'rk4', 'options': {'step_size': 0.5}, 'rtol': 1e-07, 'atol': 1e-09}
    """

    method: str = "dopri5"
    step_size: float | None = None
    rtol: float = 1e-7
    atol: float = 1e-9

    def __post_init__(self) -> None:
        if self.method not in FIXED_GRID + ADAPTIVE:
            raise InputError(f"unknown solver {self.method!r}; choose from {sorted(FIXED_GRID + ADAPTIVE)}.")
        for name in ("step_size", "rtol", "atol"):
            value = getattr(self, name)
            if value is not None or name != "step_size":
                object.__setattr__(self, name, check_positive_finite(value, f"solver {self.method}: {name}"))

    @property
    def fixed_grid(self) -> bool:
        """Whether the method steps on a fixed grid (``step_size``) rather than adaptively (``rtol``, ``atol``)."""
        return self.method in FIXED_GRID

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Solver:
        """From torchdiffeq's keywords, ``{"method": ..., "options": {"step_size": ...}, "rtol": ..., "atol": ...}``
        (missing ones at their defaults): the form a flow's ``solver`` attribute takes."""
        step = dict(options.get("options") or {}).get("step_size")
        rest = {k: options[k] for k in ("method", "rtol", "atol") if k in options}
        return cls(**rest, step_size=step)

    def override(
        self,
        method: str | None = None,
        step_size: float | None = None,
        rtol: float | None = None,
        atol: float | None = None,
    ) -> Solver:
        """This solver with what is given replaced; another ``method`` starts from the defaults (a step size or
        tolerances chosen for one method say nothing about another)."""
        base = self if method is None or method == self.method else Solver(method)
        return replace(
            base,
            step_size=base.step_size if step_size is None else step_size,
            rtol=base.rtol if rtol is None else rtol,
            atol=base.atol if atol is None else atol,
        )

    def odeint_options(self) -> dict[str, Any]:
        """Keywords for ``torchdiffeq.odeint``: ``method``, ``rtol``, ``atol`` and ``options``."""
        options = {"step_size": self.step_size} if self.fixed_grid and self.step_size is not None else {}
        return {"method": self.method, "options": options, "rtol": self.rtol, "atol": self.atol}
