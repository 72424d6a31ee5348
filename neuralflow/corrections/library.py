"""The term library: learnable constant or gated coefficients of named candidate fields (:class:`TermLibrary`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..autodiff import StateDerivatives
from ..errors import InputError
from ..flows.approximations import (
    Approximation,
)
from ..problems import Problem, check_positive_int
from .terms import FEATURES, TERMS, Correction, TermSpec, _check_names, _Context, _Factory, _feature_matrix


class _GatedCoefficient(torch.nn.Module):
    """``c = base + sigmoid(gain (lr S - 2 + margin) + MLP(features)) (scale + w . a)``: a switch at ``lr S = 2``.

    The gate (the sigmoid) switches the term on; its amplitude is ``scale`` plus, optionally, a
    linear function of a few amplitude features ``a_j`` (for example ``sigma2``, so that the
    oscillation term's coefficient can follow ``-sigma^2 / 2`` from state to state). ``base`` (only
    with ``baseline=True``; otherwise 0) is the coefficient where the switch is shut, well below the
    edge, so that ``scale`` is the coefficient's *change* at the edge. ``base``, ``scale`` and ``w``
    start at 0 (the physics alone), the MLP's last layer at 0, ``gain`` at 20 and ``margin`` at 0.05:
    below the edge of stability (``lr S < 1.9``) the gate is below 0.12, at ``lr S = 2`` it is 0.73.
    All of these are learned.
    """

    # base and weights exist only with baseline=True and with amplitude features (the fit checks with hasattr)
    base: torch.nn.Parameter
    weights: torch.nn.Parameter
    net: torch.nn.Sequential

    def __init__(
        self,
        n_features: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        n_amplitude: int = 0,
        baseline: bool = False,
    ) -> None:
        super().__init__()
        kw: _Factory = {"dtype": dtype, "device": device}
        if baseline:
            self.base = torch.nn.Parameter(torch.zeros((), **kw))
        self.scale = torch.nn.Parameter(torch.zeros((), **kw))
        self.gain = torch.nn.Parameter(torch.tensor(20.0, **kw))
        self.margin = torch.nn.Parameter(torch.tensor(0.05, **kw))
        first, last = torch.nn.Linear(n_features, hidden, **kw), torch.nn.Linear(hidden, 1, **kw)  # drawn in this order
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(first, torch.nn.Tanh(), last)
        if n_amplitude:
            self.weights = torch.nn.Parameter(torch.zeros(n_amplitude, **kw))

    def switch(self, lr_S_minus_2: Tensor, features: Tensor) -> Tensor:
        """The gate ``sigmoid(...)`` in ``[0, 1]`` per state."""
        return torch.sigmoid(self.gain * (lr_S_minus_2 + self.margin) + self.net(features)[:, 0])

    def switch_parameters(self) -> list[torch.nn.Parameter]:
        """The switch's parameters (gain, margin, network): the coefficient is nonlinear in these and linear in the
        rest (``scale``, ``weights``, ``base``), which the fit's variable projection solves for in closed form."""
        return [p for name, p in self.named_parameters() if name not in ("scale", "weights", "base")]

    def forward(self, lr_S_minus_2: Tensor, features: Tensor, amplitude: Tensor | None = None) -> Tensor:
        amp = self.scale if amplitude is None else self.scale + amplitude @ self.weights
        change = self.switch(lr_S_minus_2, features) * amp
        return change + self.base if hasattr(self, "base") else change


@dataclass(frozen=True)
class Inspection:
    """A term library evaluated on states ``(B, d)`` (:meth:`TermLibrary.inspect`), all detached.

    ``fields`` the unit-coefficient fields ``(B, d)`` and ``coefficients`` ``(B,)`` by term;
    ``switches`` the gates' switches in ``[0, 1]`` ``(B,)`` by gated term; ``features`` the columns of
    :attr:`TermLibrary.inspected_features` ``(B, F)`` (None without gates).
    """

    fields: dict[str, Tensor]
    coefficients: dict[str, Tensor]
    switches: dict[str, Tensor]
    features: Tensor | None


@dataclass(frozen=True)
class RegressionInputs:
    """What the derivative regression of :func:`neuralflow.fit.fit` reads from a term library at states ``(B, d)``
    (:meth:`TermLibrary.regression_inputs`), all detached and from one set of eigen-solves.

    ``fields`` the unit-coefficient fields ``(B, d, P)`` in the order of :attr:`TermLibrary.terms`; for a gated
    library also the gates' inputs: ``lr_S_minus_2`` ``(B,)``, ``features`` ``(B, F)`` (:attr:`feature_names`) and
    ``amplitude`` ``(B, A)`` (:attr:`amplitude_names`, None when the gates have a constant amplitude); None
    without gates.
    """

    fields: Tensor
    lr_S_minus_2: Tensor | None = None
    features: Tensor | None = None
    amplitude: Tensor | None = None


class TermLibrary(Correction):
    """``F_a(theta) = sum_i c_i(theta) lr^{p_i} field_i(theta)`` over named candidate terms.

    ``terms`` are names from :data:`TERMS` (for GD the modified equation,
    Hairer-Lubich-Wanner ch. IX, gives ``Hg = -1/2``, ``H2g = -1/3``, ``D3gg = -1/12``; the central
    flow of Cohen et al. 2025 gives ``gradS = -sigma^2/2`` at the edge of stability). A constant
    coefficient is an ``nn.Parameter`` (initially 0); a term listed in ``gated`` (or every term
    with ``gated=True``) gets a :class:`_GatedCoefficient` of the ``features``, whose amplitude is
    linear in the ``amplitude`` features (none by default; ``amplitude=["sigma2"]`` lets the
    oscillation terms learn ``c = w sigma2``, theory ``w = -1/2``). A gated term is 0 below the edge
    of stability unless it is also listed in ``baseline``: its coefficient is then a constant below
    the edge plus a gated change at ``lr S = 2`` (e.g. ``Hg``: ``-1/2`` from the modified equation
    below the edge, whatever the oscillation makes of it above).

    Parameters
    ----------
    problem : Problem
        The loss GD runs on.
    lr : float
        GD's step size.
    terms : sequence of str, default ("Hg",)
        Names from :data:`TERMS`, at least one, none repeated.
    gated : sequence of str or bool, optional
        The terms (a subset of ``terms``) whose coefficient is a gate of the ``features``; True: every term;
        None or False: none (every coefficient constant).
    features : sequence of str, default ("lr_S_minus_2", "lr_S", "loss")
        Names from :data:`FEATURES`: the gates' inputs.
    hidden : int, default 8
        Width of each gate's small MLP.
    max_critical : int, default 4
        At most this many eigenvalues count as critical (``>= 1.95 / lr``) in the terms and features that sum
        over them (``gradScrit``, ``sigma2``).
    eig_tol : float, default 1e-6
        LOBPCG's relative residual for the top eigenpairs the terms and features need.
    amplitude : sequence of str, default ()
        Names from :data:`FEATURES` in which a gated coefficient's amplitude is linear (``sigma2``: ``c = w
        sigma2``); needs gated terms.
    baseline : sequence of str, default ()
        Gated terms whose coefficient below the edge is a learned constant rather than 0.

    Raises
    ------
    InputError
        On an unknown or repeated name, a gated or baseline term outside its parent list, amplitude features
        without gated terms, or a non-positive ``hidden`` or ``max_critical``.

    Examples
    --------
    >>> import neuralflow as nf
    >>> lib = nf.TermLibrary(nf.problems.zhu_quartic(), lr=0.2, terms=["Hg", "H2g"])
    >>> lib.terms
    ['Hg', 'H2g']
    """

    name = "term-library"

    def __init__(
        self,
        problem: Problem,
        lr: float,
        terms: Sequence[str] = ("Hg",),
        gated: Sequence[str] | bool | None = None,
        features: Sequence[str] = ("lr_S_minus_2", "lr_S", "loss"),
        hidden: int = 8,
        max_critical: int = 4,
        eig_tol: float = 1e-6,
        amplitude: Sequence[str] = (),
        baseline: Sequence[str] = (),
    ) -> None:
        super().__init__(problem, lr, max_critical=max_critical, eig_tol=eig_tol)
        self.terms = _check_names(terms, TERMS, "term")
        if not self.terms:
            raise InputError(f"a TermLibrary needs at least one term; known terms are {sorted(TERMS)}.")
        if gated is True:
            gated_names = list(self.terms)
        elif gated is None or gated is False:
            gated_names = []
        else:
            gated_names = _check_names(gated, TERMS, "term")
            stray = [n for n in gated_names if n not in self.terms]
            if stray:
                raise InputError(f"gated terms {stray} are not in the library's terms {self.terms}.")
        self.gated = [n for n in self.terms if n in gated_names]
        baseline_names = _check_names(baseline, TERMS, "term")
        stray = [n for n in baseline_names if n not in self.gated]
        if stray:
            raise InputError(
                f"baseline terms {stray} are not gated; a baseline is the coefficient below the edge of "
                f"a gated term, so list them in gated=[...] too (gated: {self.gated})."
            )
        self.baseline = [n for n in self.gated if n in baseline_names]
        self.feature_names = _check_names(features, FEATURES, "feature")
        self.amplitude_names = _check_names(amplitude, FEATURES, "feature")
        if self.amplitude_names and not self.gated:
            raise InputError("amplitude features only act on gated terms; pass gated=[...] or drop amplitude.")
        check_positive_int(hidden, "hidden")
        self.hidden = hidden
        kw: _Factory = {"dtype": problem.dtype, "device": problem.device}
        self.constants = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.zeros((), **kw)) for n in self.terms if n not in self.gated}
        )
        # (B, n_constant) per-state constants that replace the parameters while set: fit's batched
        # finite-difference sensitivities run several coefficient vectors in one solve.
        self._row_constants: Tensor | None = None
        self.gates = torch.nn.ModuleDict(
            {
                n: _GatedCoefficient(
                    len(self.feature_names),
                    hidden,
                    **kw,
                    n_amplitude=len(self.amplitude_names),
                    baseline=n in self.baseline,
                )
                for n in self.gated
            }
        )

    @property
    def specs(self) -> list[TermSpec]:
        return [TERMS[n] for n in self.terms]

    def gate(self, term: str) -> _GatedCoefficient:
        """The learnable gated coefficient of the gated term ``term`` (its switch, amplitude and base)."""
        if term not in self.gated:
            raise InputError(f"term {term!r} is not gated; the gated terms are {self.gated}.")
        gate = self.gates[term]
        assert isinstance(gate, _GatedCoefficient)  # the library builds only these
        return gate

    @property
    def approximations(self) -> tuple[Approximation, ...]:  # type: ignore[override]
        """The approximations this library's terms repair (each once)."""
        return tuple(dict.fromkeys(spec.approximation for spec in self.specs))

    def _features(self, ctx: _Context) -> Tensor:
        return _feature_matrix(ctx, self.feature_names)

    def _amplitude(self, ctx: _Context) -> Tensor | None:
        """The amplitude features ``(B, A)``, or None when the gates have a constant amplitude."""
        if not self.amplitude_names:
            return None
        return _feature_matrix(ctx, self.amplitude_names)

    def _coefficients(self, ctx: _Context) -> dict[str, Tensor]:
        B = ctx.state.thetas.shape[0]
        out: dict[str, Tensor] = {}
        feats = self._features(ctx) if self.gated else None
        amp = self._amplitude(ctx)
        constants = list(self.constants)
        for n in self.terms:
            if n in self.gates:
                out[n] = self.gates[n](FEATURES["lr_S_minus_2"](ctx), feats, amp)
            elif self._row_constants is not None:
                out[n] = self._row_constants[:, constants.index(n)]
            else:
                out[n] = self.constants[n].expand(B)
        return out

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        ctx = _Context(self, state)
        coeffs = self._coefficients(ctx)
        parts = [coeffs[spec.name][:, None] * state.out(spec(ctx)) for spec in self.specs]
        return sum(parts[1:], parts[0])  # a library has at least one term

    # ---------------------------------------------------------------- inspection (report)
    def fields(self, thetas: Tensor) -> dict[str, Tensor]:
        """Unit-coefficient fields ``lr^p field_i`` on states ``(B, d)``, detached, by name."""
        ctx = self._context(thetas)
        return {spec.name: spec(ctx).detach() for spec in self.specs}

    def coefficient_values(self, thetas: Tensor) -> dict[str, Tensor]:
        """Each term's coefficient on each state ``(B,)`` (constants repeated), detached."""
        with torch.no_grad():
            return {n: c.detach() for n, c in self.coefficients_at(thetas).items()}

    def coefficients_at(self, thetas: Tensor) -> dict[str, Tensor]:
        """Each term's coefficient on each state ``(B,)``, differentiable in the library's parameters (the fit's
        delta method); the gates' inputs are derivatives of the states, held fixed."""
        return self._coefficients(self._context(thetas))

    def regression_inputs(self, thetas: Tensor) -> RegressionInputs:
        """The fields and the gates' inputs on states ``(B, d)`` for the derivative regression
        (:class:`RegressionInputs`)."""
        ctx = self._context(thetas)  # one set of derivatives (and eigen-solves) for the fields and the gate inputs
        fields = torch.stack([spec(ctx).detach() for spec in self.specs], dim=2)
        if not self.gated:
            return RegressionInputs(fields)
        amplitude = self._amplitude(ctx)
        return RegressionInputs(
            fields,
            FEATURES["lr_S_minus_2"](ctx).detach(),
            self._features(ctx).detach(),
            None if amplitude is None else amplitude.detach(),
        )

    @contextmanager
    def row_constants(self, rows: Tensor) -> Iterator[None]:
        """Inside the ``with`` block, state ``b`` of a batch uses the constant coefficients ``rows[b]`` ``(B,
        n_constants)``, in the order of :attr:`constants`, instead of the parameters: several coefficient vectors in
        one solve (the fit's batched finite-difference sensitivities)."""
        self._row_constants = rows
        try:
            yield
        finally:
            self._row_constants = None

    def contributions(self, thetas: Tensor) -> dict[str, Tensor]:
        """Each term's share ``c_i(theta) lr^p field_i(theta)`` of the correction, ``(B, d)``, by name."""
        ctx = self._context(thetas)
        with torch.no_grad():
            coeffs = self._coefficients(ctx)
        return {spec.name: (coeffs[spec.name][:, None] * spec(ctx)).detach() for spec in self.specs}

    def inspect(self, thetas: Tensor) -> Inspection:
        """Fields, coefficients, switches and features on states ``(B, d)`` from one set of eigen-solves."""
        ctx = self._context(thetas)
        with torch.no_grad():
            coeffs = {n: c.detach() for n, c in self._coefficients(ctx).items()}
            switches = {}
            if self.gated:
                edge, feats = FEATURES["lr_S_minus_2"](ctx), self._features(ctx)
                switches = {n: self.gate(n).switch(edge, feats).detach() for n in self.gated}
        return Inspection(
            fields={spec.name: spec(ctx).detach() for spec in self.specs},
            coefficients=coeffs,
            switches=switches,
            features=_feature_matrix(ctx, self.inspected_features).detach() if self.gated else None,
        )

    @property
    def inspected_features(self) -> list[str]:
        """The gates' inputs then the amplitude features (each once): the columns of :meth:`feature_values`."""
        return list(dict.fromkeys([*self.feature_names, *self.amplitude_names]))

    def feature_values(self, thetas: Tensor) -> Tensor:
        """The scalar state features ``(B, F)`` in the order of :attr:`inspected_features`, detached."""
        ctx = self._context(thetas)
        return _feature_matrix(ctx, self.inspected_features).detach()

    def features(self, thetas: Tensor) -> Tensor:
        """The old name of :meth:`feature_values` (deprecated: ``features`` is the constructor's list of names)."""
        warnings.warn("TermLibrary.features(thetas) is now feature_values(thetas).", DeprecationWarning, stacklevel=2)
        return self.feature_values(thetas)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "terms": list(self.terms),
            "gated": list(self.gated),
            "features": list(self.feature_names),
            "amplitude": list(self.amplitude_names),
            "baseline": list(self.baseline),
            "hidden": self.hidden,
            "max_critical": self.max_critical,
            "eig_tol": self.eig_tol,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, terms={self.terms}, gated={self.gated}"
