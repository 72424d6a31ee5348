"""Corrections of a flow's extra state: the terms of its equation (:data:`HIDDEN_TERMS`) and their learnable
coefficients (:class:`HiddenStateLibrary`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..autodiff import StateDerivatives
from ..errors import InputError
from ..flows.approximations import (
    CONTINUOUS_TIME_COUPLING,
    CONTINUOUS_TIME_OFF_TRACKED,
    ISOTROPIC_INJECTION,
    LINEAR_FLOQUET_GROWTH,
    SECOND_ORDER_OSCILLATION,
    Approximation,
)
from ..flows.base import Flow
from ..problems import Problem
from ..solvers import Solver
from .terms import Correction, _check_names, _Factory


@dataclass(frozen=True)
class HiddenTermSpec:
    """One term of the equation of a flow's extra state, or of ``dtheta/dt`` beside it (:data:`HIDDEN_TERMS`).

    Written per tracked direction ``i`` with ``s = s_i`` the oscillation variance along it (on the covariance
    ``X`` the flow evaluates the matrix form). ``theory`` is GD's coefficient (None where it depends on the run:
    the floor is ``q``, the lag ``1/2`` less the solver's own); ``approximation`` what a fitted coefficient away
    from the physics' own says to revise; ``equation`` ``"extra"``, ``"theta"`` or ``"lag"`` (a time shift of the
    couplings in both, which the equations print as a lag). The flow evaluates the unit-coefficient field
    (:meth:`~neuralflow.flows.Flow.hidden_fields`), since only it knows how its extra state is stored.
    ``log_scale``: the coefficient is a positive scale known only to a factor (the floor), revised by a factor
    (:class:`HiddenStateLibrary`). Its notation, as the report writes the unit field: ``text`` and ``latex`` on
    the covariance (``{x}`` stands for the extra state's symbol), ``direction_text`` and ``direction_latex`` per
    tracked direction, ``where`` what a matrix symbol of it stands for (None without one) and ``direction_where``
    the same for a flow that tracks one direction (``{x}`` its extra state's symbol). The ``theta``
    terms are written without their sign: the drift's field is ``-lr grad <H, Sigma>``.
    """

    name: str
    theory: float | None
    approximation: Approximation
    formula: str
    equation: str
    text: str
    latex: str
    direction_text: str
    direction_latex: str
    where: str | None = None
    direction_where: str | None = None
    log_scale: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "theory": self.theory,
            "formula": self.formula,
            "equation": self.equation,
            "log_scale": self.log_scale,
            "approximation": self.approximation.to_dict(),
        }


HIDDEN_TERMS: dict[str, HiddenTermSpec] = {
    spec.name: spec
    for spec in (
        HiddenTermSpec(
            "floquet",
            2.0,
            LINEAR_FLOQUET_GROWTH,
            "s log|1 - lr lambda|  (X: (R X + X R) / 2)",
            "extra",
            "(R {x} + {x} R)/2",
            r"\frac{{R{x}+{x}R}}{{2}}",
            "{x} log|1 - lr lambda|",
            r"{x}\log|1-\eta\lambda|",
            where="R = diag(log|1 - lr lambda_i|)",
        ),
        HiddenTermSpec(
            "floquet_linear",
            0.0,
            LINEAR_FLOQUET_GROWTH,
            "s (lr lambda - 2)  (X: (L X + X L) / 2, L = diag(lr lambda - 2))",
            "extra",
            "(L {x} + {x} L)/2",
            r"\frac{{L{x}+{x}L}}{{2}}",
            "{x} (lr lambda - 2)",
            r"{x}\,(\eta\lambda-2)",
            where="L = diag(lr lambda_i - 2)",
        ),
        HiddenTermSpec(
            "amplitude",
            0.0,
            LINEAR_FLOQUET_GROWTH,
            "s^2  (X: X X)",
            "extra",
            "{x} {x}",
            "{x}^{{2}}",
            "{x}^2",
            "{x}^{{2}}",
        ),
        HiddenTermSpec(
            "floor",
            None,
            ISOTROPIC_INJECTION,
            "1  (X: I)",
            "extra",
            "I",
            "I",
            "1",
            "1",
            log_scale=True,
        ),
        HiddenTermSpec(
            "drift",
            0.5,
            SECOND_ORDER_OSCILLATION,
            "-lr grad <H, Sigma>",
            "theta",
            "lr grad <H, Sigma>",
            r"\eta\,\nabla\langle H,\Sigma\rangle",
            "lr grad <H, Sigma>",
            r"\eta\,\nabla\langle H,\Sigma\rangle",
            where="Sigma = U^T X U over the tracked Hessian eigenvectors U",
            direction_where="Sigma = {x} u u^T along the top Hessian eigenvector u",
        ),
        HiddenTermSpec(
            "lag",
            None,
            CONTINUOUS_TIME_COUPLING,
            "X - tau dX/dt in the drift, r - tau dr/dt in R",
            "lag",
            "the couplings lag",
            r"\tau_{{\mathrm{{lag}}}}",
            "the couplings lag",
            r"\tau_{{\mathrm{{lag}}}}",
        ),
        HiddenTermSpec(
            "PHg",
            0.5,
            CONTINUOUS_TIME_OFF_TRACKED,
            "-lr^2 P H g,  P = I - U U^T",
            "theta",
            "lr^2 P H g",
            r"\eta^{{2}}\,PHg",
            "lr^2 P H g",
            r"\eta^{{2}}\,PHg",
            where="P = I - U U^T projects off the tracked Hessian eigenvectors U",
            direction_where="P = I - u u^T projects off the top Hessian eigenvector u",
        ),
    )
}
"""Terms of the extra state's equation by name (science notes section 7). ``floquet_linear`` is the near-edge
linearisation of ``floquet`` (theory 2 when it replaces it; 0 beside it); ``amplitude`` is the nonlinearity that
linear Floquet growth neglects. ``PHg`` is GD's first-order backward-error term (science notes section 2) off the
tracked directions, where ``lr lambda`` is small and the modified equation holds; along them ``lr lambda ~ 2`` and
the series in ``lr lambda`` does not converge (there the oscillation's own terms act). ``lag`` is the couplings'
discrete-time lag ``tau`` in steps (:class:`~neuralflow.flows.OscillationFlow`'s ``lag``; to first order the drift
sees ``X - tau dX/dt`` and the growth ``r - tau dr/dt``): GD's map lags the continuous flow by 1/2, and explicit
Euler in substeps ``h`` already lags ``h/2``, so its theory is ``1/2 - h/2`` (1/4 in the default half steps). Add a
:class:`HiddenTermSpec` here, and its field to the flows that support it."""


def lag_theory(solver: Solver) -> float:
    """The theory of the ``lag`` term integrated by ``solver``: GD's half step less the solver's own lag, ``1/2 - h/2``
    for explicit Euler in substeps ``h`` (its rates and drift are those of the substep's start), ``1/2`` for a
    higher-order method (which follows the continuous flow). On Damian et al.'s two-variable cycle both reproduce
    GD's catapult (``tests/test_oscillation.py``)."""
    if solver.method == "euler":
        return 0.5 - 0.5 * float(solver.step_size or 1.0)
    return 0.5


class HiddenStateLibrary(Correction):
    """Learnable coefficients of named hidden-state terms (:data:`HIDDEN_TERMS`) of a flow with extra state.

    The fitted model's coefficient of term ``j`` is ``c_j = p_j (1 + delta_j)`` where the physics flow has its
    own coefficient ``p_j != 0`` (:meth:`~neuralflow.flows.Flow.hidden_coefficients`: 2 for the Floquet growth,
    ``q`` for the floor, 1/2 for the drift), and ``c_j = delta_j`` where it has none; ``delta`` (the parameters)
    starts at 0, so the hybrid starts as the physics. Why a relative change on top of the physics rather than a
    replaced coefficient: the physics stays intact and readable (``Hybrid(flow, None)`` is the same model at
    ``delta = 0``), the parameter is the *revision* the data ask for, as for the theta terms of
    :class:`TermLibrary`, and a floor of 1e-20 and a growth of 2 get parameters of the same scale (Gauss-Newton's
    finite differences and LBFGS need that). :meth:`coefficients` gives ``c_j``.

    A term with :attr:`HiddenTermSpec.log_scale` (the floor) is revised by a factor instead, ``c_j = p_j
    exp(delta_j)`` (the same to first order at ``delta = 0``). Why: the floor is known only to orders of magnitude
    (``q = nu^2`` against a round-off floor, 1e-20 against 1e-17) and it reaches the fit through the log-variance
    residual, which is linear in ``log c``, so Gauss-Newton's linearised step in ``delta`` is the right one; in the
    relative form a step from ``10 q`` to ``q`` is ``delta`` 9 -> 0 along a residual that bends like ``log(1 +
    delta)``, and a slightly longer step makes the floor negative.

    At the edge of stability fit ``terms=("floquet", "drift", "floor", "amplitude")`` with
    ``nf.fit(..., variance_weight=1)`` (``benchmarks/eos_hidden_fit.py``; measured on the digits run in the README):
    the growth and the floor reach ``theta`` only through the oscillation's size, so without the measured variance
    they are read from the oscillating windows alone, where linear Floquet growth has nothing to saturate it and
    the growth coefficient bends to stand in (1.2-1.6 against 2); the amplitude-dependent rate is that saturation,
    and the variance part reads the growth from the quiet stretch and the floor from the onset (2.02-2.05). Use
    short windows (``window=5, stride=15`` in steps): over a window the model's variance parts from GD's where the
    physics misses the catapult's saturation, and the drift coupling absorbs that the more, the longer the window
    (on the digits run 0.67 over 40 steps, 0.61 over 20, 0.46 over 5, against GD's own 0.500 read step by step from
    its iterates; ``benchmarks/eos_gd_couplings.py``). Fit
    them on ``OscillationFlow(..., order=1)``, whose ``dtheta/dt`` has GD's backward-error term off the tracked
    directions: over 20-step windows that term's effect is too small to be read (fitted as ``PHg`` it came out at
    -0.4 against GD's 1/2), while over a whole run it brings the flow 1.4x closer to GD (README). The
    amplitude-dependent rate lowers the windows' error but makes a whole-run rollout worse (measured there): fit it
    to learn what is left, and leave it out of a model meant for rollouts. The couplings' lag (``lag``) sets a
    catapult's depth and is invisible over 5 steps: fit it on windows that span GD's catapults (35 steps from 20
    before each peak, ``benchmarks/eos_hidden_fit.py --catapults 20 --window 35``), alone or beside the
    amplitude-dependent rate, with which it trades (README "Fitting the couplings' lag").

    ``init`` starts chosen terms from other coefficients than the physics' (``{"floquet": 1.0, "drift": 1.0,
    "floor": 1e-19}``: values of ``c_j`` themselves), so that a fit has to find the physics rather than start on
    it; they are set when the library joins a flow in :class:`Hybrid` (which knows the ``p_j``).
    """

    name = "hidden-state"

    def __init__(
        self, problem: Problem, lr: float, terms: Sequence[str] = ("floquet",), init: dict[str, float] | None = None
    ) -> None:
        super().__init__(problem, lr)
        self.terms = _check_names(terms, HIDDEN_TERMS, "hidden-state term")
        if not self.terms:
            raise InputError(f"a HiddenStateLibrary needs at least one term; known terms are {sorted(HIDDEN_TERMS)}.")
        init = dict(init or {})
        unknown = [n for n in init if n not in self.terms]
        finite = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in init.values()
        )
        if unknown or not finite:
            raise InputError(
                f"HiddenStateLibrary: init must give finite coefficients of its own terms {self.terms}; got {init!r}."
            )
        self.init = {n: float(v) for n, v in init.items()}
        self._init_pending = bool(self.init)
        kw: _Factory = {"dtype": problem.dtype, "device": problem.device}
        self.deltas = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros((), **kw)) for n in self.terms})

    def start_from(self, flow: Flow) -> None:
        """Set ``delta`` so that the coefficients with ``flow`` are :attr:`init`, the first time only (``Hybrid``
        calls it when it is built; a library loaded from a checkpoint keeps its fitted ``delta``)."""
        if not self._init_pending:
            return
        own = flow.hidden_coefficients()
        with torch.no_grad():
            for name, value in self.init.items():
                if own[name] == 0:
                    self.deltas[name].fill_(value)
                elif HIDDEN_TERMS[name].log_scale:
                    if not value / own[name] > 0:
                        raise InputError(
                            f"HiddenStateLibrary: init[{name!r}] = {value:g} must have the sign of the "
                            f"physics' {own[name]:g}; the {name} is revised by a positive factor."
                        )
                    self.deltas[name].fill_(math.log(value / own[name]))
                else:
                    self.deltas[name].fill_(value / own[name] - 1)
        self._init_pending = False

    @property
    def specs(self) -> list[HiddenTermSpec]:
        return [HIDDEN_TERMS[n] for n in self.terms]

    @property
    def approximations(self) -> tuple[Approximation, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(spec.approximation for spec in self.specs))

    def coefficients(self, flow: Flow) -> dict[str, Tensor]:
        """The model's coefficient ``c_j`` of each term with ``flow``'s own ``p_j`` (differentiable in ``delta``)."""
        own = flow.hidden_coefficients()
        out = {}
        for n in self.terms:
            if own[n] == 0:
                out[n] = self.deltas[n]
            elif HIDDEN_TERMS[n].log_scale:
                out[n] = own[n] * torch.exp(self.deltas[n])
            else:
                out[n] = own[n] * (1 + self.deltas[n])
        return out

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        raise InputError("a HiddenStateLibrary acts on a flow's extra state; use it inside nf.Hybrid(flow, library).")

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "terms": list(self.terms), "init": dict(self.init)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, terms={self.terms}"
