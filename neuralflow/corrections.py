"""Learnable corrections added to a physics flow (stage 4 of the pipeline).

A correction is a vector field ``F_a(theta)`` in step time; the model that is fitted to GD is
``dtheta/dt = F_p(theta) + F_a(theta)`` with ``F_p`` a physics flow (:class:`Hybrid`). Two kinds:

* :class:`TermLibrary`: a learnable linear combination of named candidate fields (:data:`TERMS`),
  each carrying its natural power of ``lr`` so that a fitted coefficient is a pure number
  comparable with theory, and each tied to the :class:`~neuralflow.flows.Approximation` it repairs.
  A coefficient is a constant or *gated*: a tiny network of scalar state features (``lr S - 2``,
  ``lr S``, the loss) that can stay near 0 below the edge of stability and switch on at ``lr S = 2``.
* :class:`NeuralCorrection`: a free-form network for small problems, when no term fits.
* :class:`HiddenStateLibrary`: for a flow that carries state beyond ``theta`` (the oscillation flow's
  covariance), learnable changes of the coefficients of named terms (:data:`HIDDEN_TERMS`) of the extra
  state's equation and of its coupling back into ``dtheta/dt``.
* :class:`LatentCorrection`: for problems with no known physics of a missing state, ``m`` latent states of its
  own with a small network for their dynamics and a linear read-out into ``dtheta/dt`` (an augmented neural ODE).

Every field is evaluated on a batch of states through one
:class:`~neuralflow.autodiff.StateDerivatives`, so it stays differentiable with respect to the
states (what the adjoint method's vector-Jacobian products need), and terms within one evaluation
share their derivatives (``g`` and ``H g`` are computed once).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor

from .autodiff import StateDerivatives, top_eigenpairs
from .errors import InputError
from .flows import FLOWS
from .flows.approximations import (
    CONTINUOUS_TIME_1,
    CONTINUOUS_TIME_2,
    EFFECTIVE_STEP_SIZE,
    ISOTROPIC_INJECTION,
    LINEAR_FLOQUET_GROWTH,
    NO_OSCILLATION,
    NO_OSCILLATION_CRITICAL,
    SECOND_ORDER_OSCILLATION,
    SLAVED_TOP_DIRECTION,
    Approximation,
)
from .flows.base import ExtraState, Flow
from .problems import Problem

__all__ = [
    "TermSpec",
    "TERMS",
    "FeatureSpec",
    "FEATURES",
    "Correction",
    "TermLibrary",
    "NeuralCorrection",
    "HiddenTermSpec",
    "HIDDEN_TERMS",
    "HiddenStateLibrary",
    "LatentCorrection",
    "Hybrid",
    "CORRECTIONS",
    "EFFECTIVE_STEP_SIZE",
    "NO_OSCILLATION_CRITICAL",
    "SLAVED_TOP_DIRECTION",
]


class _Factory(TypedDict):
    """The keyword arguments that put a new tensor or layer on a problem's dtype and device."""

    dtype: torch.dtype
    device: torch.device


class _Context:
    """Derivatives shared by the terms and features of one evaluation on a batch of states.

    Quantities are computed on first use and kept, so ``g``, ``H g`` and the top eigenpairs are
    evaluated once however many terms need them. Eigenvectors are computed outside the graph
    (held fixed), so ``u^T H u`` is a differentiable sharpness whose gradient is ``D3L[u, u]``.
    """

    def __init__(self, owner: Correction, state: StateDerivatives) -> None:
        self.owner = owner
        self.state = state
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            with torch.enable_grad():  # products of derivatives must stay in the graph for grad_of
                self._cache[key] = compute()
        return self._cache[key]

    @property
    def g(self) -> Tensor:
        return self.state.g

    @property
    def Hg(self) -> Tensor:
        return self._get("Hg", lambda: self.state.hvp(self.g))

    @property
    def H2g(self) -> Tensor:
        return self._get("H2g", lambda: self.state.hvp(self.Hg))

    @property
    def D3gg(self) -> Tensor:
        # grad (g^T H g) = 2 H^2 g + D3L[g, g]
        return self._get("D3gg", lambda: self.state.grad_of((self.g * self.Hg).sum(1)) - 2 * self.H2g)

    def eigen(self, k: int) -> tuple[Tensor, Tensor]:
        """Top ``k`` eigenvalues ``(B, k)`` and unit eigenvectors ``(B, k, d)``, detached."""
        return self._get(f"eigen{k}", lambda: self.owner._eigenpairs(self.state.thetas, k))

    def rayleigh(self, k: int) -> Tensor:
        """``u_j^T H u_j`` for the top ``k`` eigenvectors held fixed, ``(B, k)``, differentiable."""

        def compute() -> Tensor:
            _, vecs = self.eigen(k)
            return torch.stack([(vecs[:, j] * self.state.hvp(vecs[:, j])).sum(1) for j in range(k)], dim=1)

        return self._get(f"rayleigh{k}", compute)

    @property
    def S(self) -> Tensor:
        """Sharpness ``S = u^T H u`` per state ``(B,)``; its gradient is ``grad S = D3L[u, u]``."""
        return self.rayleigh(1)[:, 0]

    @property
    def gradS(self) -> Tensor:
        return self._get("gradS", lambda: self.state.grad_of(self.S))

    @property
    def gradScrit(self) -> Tensor:
        def compute() -> Tensor:
            k = min(self.owner.max_critical, self.owner.problem.dim)
            values, _ = self.eigen(k)
            critical = (values >= 1.95 / self.owner.lr).to(values.dtype)
            return self.state.grad_of((self.rayleigh(k) * critical).sum(1))

        return self._get("gradScrit", compute)

    @property
    def sigma2(self) -> Tensor:
        """Self-stabilisation variance ``2 alpha / beta = max(0, -2 <g, grad L> / ||grad L||^2)`` ``(B,)``, detached.

        ``L`` is the sum of the critical eigenvalues (the sharpness ``S`` where none is critical):
        the oscillation variance that stops ``L`` from rising (Damian, Nichani, Lee 2023; for one
        critical eigenvalue the central flow's ``sigma^2``, Cohen et al. 2025), held fixed in derivatives.
        """

        def compute() -> Tensor:
            grad = self.gradScrit.detach()
            none = grad.square().sum(1) == 0
            if bool(none.any()):
                grad = torch.where(none[:, None], self.gradS.detach(), grad)
            beta = grad.square().sum(1).clamp_min(torch.finfo(grad.dtype).tiny)
            return (-2 * (self.g.detach() * grad).sum(1) / beta).clamp_min(0)

        return self._get("sigma2", compute)

    @property
    def u_ug(self) -> Tensor:
        def compute() -> Tensor:
            u = self.eigen(1)[1][:, 0]
            return (u * self.g).sum(1, keepdim=True) * u

        return self._get("u_ug", compute)


@dataclass(frozen=True)
class TermSpec:
    r"""One candidate correction field ``lr^power * field(theta)`` (an entry of :data:`TERMS`).

    ``theory`` is the coefficient GD has in front of it (None where it depends on the problem);
    ``approximation`` is what a non-zero fitted coefficient says to revise; ``formula`` the field
    as a researcher writes it in plain text and ``latex`` in LaTeX math (``\eta`` for ``lr``; the report's
    corrected ODE, parsed by matplotlib's mathtext too); ``unit_field`` computes ``field`` (without the power of
    ``lr``) from the shared derivatives of one evaluation.
    """

    name: str
    power: int
    theory: float | None
    approximation: Approximation
    formula: str
    latex: str
    unit_field: Callable[[_Context], Tensor]

    def __call__(self, ctx: _Context) -> Tensor:
        """The unit-coefficient vector field ``lr^power * field`` on the context's states, ``(B, d)``."""
        return ctx.owner.lr**self.power * self.unit_field(ctx)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "power": self.power,
            "theory": self.theory,
            "formula": self.formula,
            "approximation": self.approximation.to_dict(),
        }


TERMS: dict[str, TermSpec] = {
    spec.name: spec
    for spec in (
        TermSpec("g", 1, 0.0, EFFECTIVE_STEP_SIZE, "lr g", r"\eta\,g", lambda c: c.g),
        TermSpec("Hg", 2, -1 / 2, CONTINUOUS_TIME_1, "lr^2 H g", r"\eta^{2}\,H g", lambda c: c.Hg),
        TermSpec("H2g", 3, -1 / 3, CONTINUOUS_TIME_2, "lr^3 H^2 g", r"\eta^{3}\,H^{2} g", lambda c: c.H2g),
        TermSpec("D3gg", 3, -1 / 12, CONTINUOUS_TIME_2, "lr^3 D3L[g, g]", r"\eta^{3}\,D^{3}L[g,g]", lambda c: c.D3gg),
        TermSpec("gradS", 1, None, NO_OSCILLATION, "lr grad S", r"\eta\,\nabla S", lambda c: c.gradS),
        TermSpec(
            "gradScrit", 1, None, NO_OSCILLATION_CRITICAL, "lr grad sum_{lambda_i >= 1.95/lr} lambda_i",
            r"\eta\,\nabla\sum_{\lambda_i\geq 1.95/\eta}\lambda_i", lambda c: c.gradScrit,
        ),
        TermSpec("u_ug", 1, None, SLAVED_TOP_DIRECTION, "lr (u . g) u", r"\eta\,(u\cdot g)\,u", lambda c: c.u_ug),
    )
}
"""Candidate correction terms by name. Add a :class:`TermSpec` here to make a term available."""

@dataclass(frozen=True)
class FeatureSpec:
    """One scalar state feature ``x(theta)`` that gated coefficients and feature networks read (an entry of
    :data:`FEATURES`).

    ``text`` and ``latex`` write it (the report's gate formulas and axes); ``edge`` is the value where it crosses
    the edge of stability, ``lr S = 2`` (the knot of the report's gate basis; None for a feature with no such
    value); ``value`` computes it, ``(B,)``, from the shared derivatives of one evaluation.
    """

    name: str
    text: str
    latex: str
    edge: float | None
    value: Callable[[_Context], Tensor]

    def __call__(self, ctx: _Context) -> Tensor:
        """The feature on the context's states, ``(B,)``."""
        return self.value(ctx)


FEATURES: dict[str, FeatureSpec] = {
    spec.name: spec
    for spec in (
        FeatureSpec("lr_S_minus_2", "lr S - 2", r"\eta S-2", 0.0, lambda c: c.owner.lr * c.S - 2),
        FeatureSpec("lr_S", "lr S", r"\eta S", 2.0, lambda c: c.owner.lr * c.S),
        FeatureSpec("loss", "L", "L", None, lambda c: c.state.losses),
        FeatureSpec("sigma2", "sigma^2", r"\sigma^{2}", None, lambda c: c.sigma2),
    )
}
"""Scalar state features by name. Add a :class:`FeatureSpec` here to make a feature available."""


def _feature_matrix(ctx: _Context, names: Sequence[str]) -> Tensor:
    """The named :data:`FEATURES` of the context's states as columns, ``(B, len(names))``."""
    return torch.stack([FEATURES[n](ctx) for n in names], dim=1)


def _check_names(names: Sequence[str], known: dict[str, Any], what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown {what} {unknown}; known {what}s are {sorted(known)}.")
    if len(set(names)) != len(names):
        raise InputError(f"{what} names must not repeat, got {names}.")
    return names


class Correction(Flow):
    """Base class of learnable corrections: a vector field in step time on ``problem`` at ``lr``.

    Shares :meth:`Flow.forward` (states ``(d,)`` or ``(B, d)``, differentiable when the states
    require grad). Subclasses implement :meth:`vector_field` and :meth:`config`. Top
    eigenvectors, where needed, are found by warm-started LOBPCG per state, the warm start
    cached per batch size (the windows of a fit keep their batch positions between solves).
    """

    name = "correction"

    def __init__(self, problem: Problem, lr: float, max_critical: int = 4, eig_tol: float = 1e-6) -> None:
        super().__init__(problem, lr)
        if isinstance(max_critical, bool) or not isinstance(max_critical, int) or max_critical < 1:
            raise InputError(f"max_critical must be a positive int, got {max_critical!r}.")
        self.max_critical = max_critical
        self.eig_tol = float(eig_tol)
        self._eig_blocks: dict[tuple[int, int], list[Tensor | None]] = {}
        self._eig_generator = torch.Generator(device=problem.device).manual_seed(0)

    def reset_cache(self) -> None:
        """Forget the eigenvector warm starts and reseed their random start (for reproducible fits)."""
        self._eig_blocks.clear()
        self._eig_generator.manual_seed(0)

    def _eigenpairs(self, thetas: Tensor, k: int) -> tuple[Tensor, Tensor]:
        blocks = self._eig_blocks.setdefault((thetas.shape[0], k), [None] * thetas.shape[0])
        values, vectors = [], []
        for b, theta in enumerate(thetas.detach()):
            res = top_eigenpairs(
                self.problem, theta, k=k, v0=blocks[b], tol=self.eig_tol, generator=self._eig_generator
            )
            blocks[b] = res.block
            values.append(res.values)
            vectors.append(res.vectors)
        return torch.stack(values), torch.stack(vectors)

    def _context(self, thetas: Tensor) -> _Context:
        """Shared derivatives of a ``(B, d)`` batch, detached from the states (for inspection)."""
        self.problem.check_theta(thetas, "states")
        if thetas.dim() != 2:
            raise InputError(f"expected a (B, {self.problem.dim}) batch of states, got shape {tuple(thetas.shape)}.")
        return _Context(self, StateDerivatives(self.problem, thetas, create_graph=False))


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

    def __init__(self, n_features: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 n_amplitude: int = 0, baseline: bool = False) -> None:
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
            raise InputError(f"baseline terms {stray} are not gated; a baseline is the coefficient below the edge of "
                             f"a gated term, so list them in gated=[...] too (gated: {self.gated}).")
        self.baseline = [n for n in self.gated if n in baseline_names]
        self.feature_names = _check_names(features, FEATURES, "feature")
        self.amplitude_names = _check_names(amplitude, FEATURES, "feature")
        if self.amplitude_names and not self.gated:
            raise InputError("amplitude features only act on gated terms; pass gated=[...] or drop amplitude.")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise InputError(f"hidden must be a positive int, got {hidden!r}.")
        self.hidden = hidden
        kw: _Factory = {"dtype": problem.dtype, "device": problem.device}
        self.constants = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.zeros((), **kw)) for n in self.terms if n not in self.gated}
        )
        # (B, n_constant) per-state constants that replace the parameters while set: fit's batched
        # finite-difference sensitivities run several coefficient vectors in one solve.
        self._row_constants: Tensor | None = None
        self.gates = torch.nn.ModuleDict(
            {n: _GatedCoefficient(len(self.feature_names), hidden, **kw, n_amplitude=len(self.amplitude_names),
                                  baseline=n in self.baseline)
             for n in self.gated}
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
        return RegressionInputs(fields, FEATURES["lr_S_minus_2"](ctx).detach(), self._features(ctx).detach(),
                                None if amplitude is None else amplitude.detach())

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


class NeuralCorrection(Correction):
    """Free-form correction ``F_a(theta) = lr * MLP(x)`` for low-dimensional problems.

    ``features="state"``: ``x = theta`` (``d`` inputs); ``features="features"``: ``x`` = the
    scalar state features of :data:`FEATURES` (then ``F_a`` depends on ``theta`` only through
    them). Two tanh hidden layers of width ``hidden``; the output layer starts at 0, so the
    model starts as the physics alone (the universal differential equations of Rackauckas et al. 2020).
    """

    name = "neural"

    def __init__(
        self,
        problem: Problem,
        lr: float,
        features: str = "state",
        hidden: int = 64,
        feature_names: Sequence[str] = ("lr_S_minus_2", "lr_S", "loss"),
        seed: int = 0,
        max_critical: int = 4,
        eig_tol: float = 1e-6,
    ) -> None:
        super().__init__(problem, lr, max_critical=max_critical, eig_tol=eig_tol)
        if features not in ("state", "features"):
            raise InputError(f"NeuralCorrection: features must be 'state' or 'features', got {features!r}.")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise InputError(f"hidden must be a positive int, got {hidden!r}.")
        self.inputs = features
        self.feature_names = _check_names(feature_names, FEATURES, "feature")
        self.hidden = hidden
        self.seed = seed
        n_in = problem.dim if features == "state" else len(self.feature_names)
        kw: _Factory = {"dtype": problem.dtype, "device": problem.device}
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        first, middle, last = (
            torch.nn.Linear(n_in, hidden, **kw),
            torch.nn.Linear(hidden, hidden, **kw),
            torch.nn.Linear(hidden, problem.dim, **kw),
        )
        torch.random.set_rng_state(gen_state)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(first, torch.nn.Tanh(), middle, torch.nn.Tanh(), last)

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        if self.inputs == "state":
            x = state.thetas
        else:
            ctx = _Context(self, state)
            x = _feature_matrix(ctx, self.feature_names)
        return self.lr * self.net(x if state.create_graph else x.detach())

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "features": self.inputs,
            "hidden": self.hidden,
            "feature_names": list(self.feature_names),
            "seed": self.seed,
            "max_critical": self.max_critical,
            "eig_tol": self.eig_tol,
        }


@dataclass(frozen=True)
class HiddenTermSpec:
    """One term of the equation of a flow's extra state, or of its coupling into ``dtheta/dt`` (:data:`HIDDEN_TERMS`).

    Written per tracked direction ``i`` with ``s = s_i`` the oscillation variance along it (on the covariance
    ``X`` the flow evaluates the matrix form). ``theory`` is GD's coefficient (None where it depends on the run:
    the floor is ``q``); ``approximation`` what a fitted coefficient away from the physics' own says to revise;
    ``equation`` ``"extra"`` or ``"theta"``. The flow evaluates the unit-coefficient field
    (:meth:`~neuralflow.flows.Flow.hidden_fields`), since only it knows how its extra state is stored.
    ``log_scale``: the coefficient is a positive scale known only to a factor (the floor), revised by a factor
    (:class:`HiddenStateLibrary`).
    """

    name: str
    theory: float | None
    approximation: Approximation
    formula: str
    equation: str
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
        HiddenTermSpec("floquet", 2.0, LINEAR_FLOQUET_GROWTH, "s log|1 - lr lambda|  (X: (R X + X R) / 2)", "extra"),
        HiddenTermSpec("floquet_linear", 0.0, LINEAR_FLOQUET_GROWTH,
                       "s (lr lambda - 2)  (X: (L X + X L) / 2, L = diag(lr lambda - 2))", "extra"),
        HiddenTermSpec("amplitude", 0.0, LINEAR_FLOQUET_GROWTH, "s^2  (X: X X)", "extra"),
        HiddenTermSpec("floor", None, ISOTROPIC_INJECTION, "1  (X: I)", "extra", log_scale=True),
        HiddenTermSpec("drift", 0.5, SECOND_ORDER_OSCILLATION, "-lr grad <H, Sigma>", "theta"),
    )
}
"""Terms of the extra state's equation by name (science notes section 7). ``floquet_linear`` is the near-edge
linearisation of ``floquet`` (theory 2 when it replaces it; 0 beside it); ``amplitude`` is the nonlinearity that
linear Floquet growth neglects. Add a :class:`HiddenTermSpec` here, and its field to the flows that support it."""


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
    and the variance part reads the growth from the quiet stretch and the floor from the onset (2.02-2.05).

    ``init`` starts chosen terms from other coefficients than the physics' (``{"floquet": 1.0, "drift": 1.0,
    "floor": 1e-19}``: values of ``c_j`` themselves), so that a fit has to find the physics rather than start on
    it; they are set when the library joins a flow in :class:`Hybrid` (which knows the ``p_j``).
    """

    name = "hidden-state"

    def __init__(self, problem: Problem, lr: float, terms: Sequence[str] = ("floquet",),
                 init: dict[str, float] | None = None) -> None:
        super().__init__(problem, lr)
        self.terms = _check_names(terms, HIDDEN_TERMS, "hidden-state term")
        if not self.terms:
            raise InputError(f"a HiddenStateLibrary needs at least one term; known terms are {sorted(HIDDEN_TERMS)}.")
        init = dict(init or {})
        unknown = [n for n in init if n not in self.terms]
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     for v in init.values())
        if unknown or not finite:
            raise InputError(f"HiddenStateLibrary: init must give finite coefficients of its own terms {self.terms}; "
                             f"got {init!r}.")
        self.init = {n: float(v) for n, v in init.items()}
        self._init_pending = bool(self.init)
        kw: _Factory = {"dtype": problem.dtype, "device": problem.device}
        self.deltas = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros((), **kw)) for n in self.terms})

    def start_from(self, flow: Flow) -> None:
        """Set ``delta`` so that the coefficients with ``flow`` are :attr:`init` (``Hybrid`` calls it once)."""
        own = flow.hidden_coefficients()
        with torch.no_grad():
            for name, value in self.init.items():
                if own[name] == 0:
                    self.deltas[name].fill_(value)
                elif HIDDEN_TERMS[name].log_scale:
                    if not value / own[name] > 0:
                        raise InputError(f"HiddenStateLibrary: init[{name!r}] = {value:g} must have the sign of the "
                                         f"physics' {own[name]:g}; the {name} is revised by a positive factor.")
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


class LatentCorrection(Correction):
    """A latent neural correction: ``m`` latent states ``z`` of its own, for a missing state with no known physics.

    An augmented neural ODE (Dupont, Doucet, Teh, NeurIPS 2019) with a linear read-out, as in latent ODEs (Rubanova,
    Chen, Duvenaud, NeurIPS 2019). In step time::

        dz/dt      = lr f_phi(x(theta), z)                                        (m equations)
        F_a(theta, z) = sum_j (W z)_j lr^{p_j} field_j(theta)  +  lr P z           (added to the flow's dtheta/dt)

    ``f_phi`` is a tanh network with one hidden layer of width ``hidden`` on ``[x, z]``, ``x = theta``
    (``features="state"``) or the scalar state features of :data:`FEATURES` (``features="features"``). The read-out
    is linear in ``z`` and readable: ``(W z)_j`` is a history-dependent coefficient of the named candidate field
    ``j`` of :data:`TERMS` (``fields``; ``("g",)``: a history-dependent step size, theory 0), and, with
    ``direct=True``, ``P`` (``d x m``) a rank-``m`` force whose columns are directions in parameter space (what a
    momentum-like state needs: a velocity where ``g = 0``). Why a latent state at all: a correction of ``theta``
    alone gives one velocity per state, so it cannot reproduce a system that passes one ``theta`` twice with two
    velocities (a hidden variable with its own dynamics); the latent states carry that memory.

    The last layer of ``f_phi`` starts at 0 and ``z`` starts at 0 (:meth:`Hybrid.initial_extra
    <neuralflow.corrections.Hybrid.initial_extra>`: nothing is measured about ``z``), so ``z`` stays 0 and the
    hybrid starts as the physics; ``W`` and ``P`` start small and random (seeded by ``seed``) so that the gradient
    of the fit reaches ``f_phi``. Inside :class:`Hybrid` the ODE state is ``[theta, flow extra (if any), z]``. In
    :func:`~neuralflow.fit.fit` each window's ``z`` starts at 0 (``extra_start="measured"``: the correction
    remembers nothing from before the window) or at a start fitted per window (``extra_start="fitted"``, together
    with the flow's own extra state if it has one), which a history that began before the window needs.
    """

    name = "latent"

    def __init__(
        self,
        problem: Problem,
        lr: float,
        m: int = 2,
        fields: Sequence[str] = ("g",),
        direct: bool = True,
        features: str = "state",
        hidden: int = 16,
        feature_names: Sequence[str] = ("lr_S_minus_2", "lr_S", "loss"),
        seed: int = 0,
        max_critical: int = 4,
        eig_tol: float = 1e-6,
    ) -> None:
        super().__init__(problem, lr, max_critical=max_critical, eig_tol=eig_tol)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise InputError(f"LatentCorrection: m (the number of latent states) must be a positive int, got {m!r}.")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise InputError(f"LatentCorrection: hidden must be a positive int, got {hidden!r}.")
        if features not in ("state", "features"):
            raise InputError(f"LatentCorrection: features must be 'state' or 'features', got {features!r}.")
        if not isinstance(direct, bool):
            raise InputError(f"LatentCorrection: direct must be True or False, got {direct!r}.")
        self.fields = _check_names(fields, TERMS, "term")
        if not self.fields and not direct:
            raise InputError("LatentCorrection: the latent states must reach dtheta/dt; name fields=[...] (e.g. "
                             "['g']) or pass direct=True.")
        self.m, self.hidden, self.inputs, self.direct, self.seed = m, hidden, features, direct, seed
        self.feature_names = _check_names(feature_names, FEATURES, "feature")
        n_in = problem.dim if features == "state" else len(self.feature_names)
        kw: _Factory = {"dtype": problem.dtype, "device": problem.device}
        # drawn in float64 on the CPU from the seed alone, then cast and moved: the same start on every device
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            f64 = torch.float64
            first, last = torch.nn.Linear(n_in + m, hidden, dtype=f64), torch.nn.Linear(hidden, m, dtype=f64)
            readout, force = torch.randn(len(self.fields), m, dtype=f64) / m, torch.randn(problem.dim, m, dtype=f64) / m
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(first, torch.nn.Tanh(), last).to(**kw)
        if self.fields:
            self.readout = torch.nn.Parameter(readout.to(**kw))  # W
        if direct:
            self.force = torch.nn.Parameter(force.to(**kw))  # P

    @property
    def latent(self) -> ExtraState:
        """What the latent states are: ``z``, shape ``(m,)``."""
        return ExtraState("latent", "z", (self.m,), f"{self.m} latent state(s) of the neural correction, "
                          "with learned dynamics and no measurement")

    @property
    def approximations(self) -> tuple[Approximation, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(TERMS[n].approximation for n in self.fields))

    def latent_field(self, t: Tensor, state: StateDerivatives, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(F_a, dz/dt)`` on states ``state.thetas`` ``(B, d)`` with latent states ``z`` ``(B, m)``."""
        if z.dim() != 2 or z.shape != (state.thetas.shape[0], self.m):
            raise InputError(f"LatentCorrection: expected latent states of shape ({state.thetas.shape[0]}, {self.m}), "
                             f"got {tuple(z.shape)}.")
        ctx = _Context(self, state)
        x = state.out(state.thetas if self.inputs == "state" else _feature_matrix(ctx, self.feature_names))
        dz = self.lr * self.net(torch.cat([x, z], dim=1))
        out = torch.zeros_like(state.thetas) if not self.direct else self.lr * z @ self.force.T
        if self.fields:
            coeffs = z @ self.readout.T  # (B, K): each field's coefficient (W z)_j
            for j, n in enumerate(self.fields):
                out = out + coeffs[:, j : j + 1] * state.out(TERMS[n](ctx))
        return out, dz

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        raise InputError("a LatentCorrection carries latent states of its own; use it inside "
                         "nf.Hybrid(flow, correction), whose ODE state is [theta, flow extra state (if any), z].")

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "m": self.m,
            "fields": list(self.fields),
            "direct": self.direct,
            "features": self.inputs,
            "hidden": self.hidden,
            "feature_names": list(self.feature_names),
            "seed": self.seed,
            "max_critical": self.max_critical,
            "eig_tol": self.eig_tol,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, fields={self.fields}, direct={self.direct}"


CORRECTIONS: dict[str, type[Correction]] = {
    "term-library": TermLibrary, "neural": NeuralCorrection, "hidden-state": HiddenStateLibrary,
    "latent": LatentCorrection,
}


class Hybrid(Flow):
    """``dtheta/dt = F_p(theta) + F_a(theta)``: a physics flow plus a learnable correction.

    The ODE right-hand side handed to torchdiffeq. ``Hybrid(flow, None)`` is the physics alone.
    Both parts read one shared :class:`~neuralflow.autodiff.StateDerivatives` per evaluation.

    For a flow with extra state (``flow.extra_state``) the hybrid's ODE state is the flow's ``[theta, extra]``.
    A :class:`HiddenStateLibrary` then adds ``(c_j - p_j)`` times each of its terms' fields (the flow's
    :meth:`~neuralflow.flows.Flow.hidden_fields`); a :class:`TermLibrary` or :class:`NeuralCorrection` adds its
    field to ``dtheta/dt`` only, and the extra state follows the physics.

    A :class:`LatentCorrection` appends its latent states: the ODE state is ``[theta, flow extra (if any), z]``, and
    the hybrid's :attr:`extra_state` is everything after ``theta`` as one flat vector (``name`` ``"latent"`` or, on
    a flow with extra state, e.g. ``"covariance+latent"``); :meth:`split`, :meth:`join`, :meth:`initial_extra`
    (the flow's start, then ``z = 0``) and :meth:`rebase` cover it, so ``simulate``, ``compare``, ``fit`` and
    checkpoints need nothing else. :meth:`flow_part` gives the flow's own ODE state and ``z``.
    """

    name = "hybrid"

    def __init__(self, flow: Flow, correction: Correction | None = None) -> None:
        if not isinstance(flow, Flow) or isinstance(flow, Correction):
            raise InputError(
                f"Hybrid: flow must be a physics flow (one of {sorted(FLOWS)}), got {type(flow).__name__}."
            )
        if correction is not None:
            if not isinstance(correction, Correction):
                raise InputError(
                    "Hybrid: correction must be a TermLibrary, NeuralCorrection, HiddenStateLibrary or "
                    f"LatentCorrection (or None), got {type(correction).__name__}."
                )
            if correction.problem is not flow.problem:
                raise InputError("Hybrid: the flow and the correction must be built on the same Problem object.")
            if abs(correction.lr - flow.lr) > 1e-12 * flow.lr:
                raise InputError(f"Hybrid: the flow has lr={flow.lr:g} but the correction lr={correction.lr:g}.")
        if isinstance(correction, HiddenStateLibrary):
            supported = flow.hidden_coefficients()
            missing = [n for n in correction.terms if n not in supported]
            if missing:
                raise InputError(
                    f"Hybrid: the {flow.name} flow cannot evaluate the hidden-state terms {missing}"
                    + (f"; it supports {sorted(supported)}." if supported else
                       " (it carries no state beyond theta); use a flow with extra state, e.g. the oscillation flow.")
                )
            if correction._init_pending:
                correction.start_from(flow)
        super().__init__(flow.problem, flow.lr)
        self.flow = flow
        self.correction = correction
        self.extra_state = flow.extra_state
        if isinstance(correction, LatentCorrection):
            own = flow.extra_state
            latent = correction.latent
            self.extra_state = latent if own is None else ExtraState(
                f"{own.name}+{latent.name}", f"[{own.symbol}, {latent.symbol}]", (own.size + latent.size,),
                f"{own.statement}, flattened, then {latent.statement}",
            )

    @property
    def approximations(self) -> tuple[Approximation, ...]:  # type: ignore[override]
        return tuple(self.flow.approximations)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        if self.extra_state is None:
            return super().forward(t, y)
        batch = y if y.dim() == 2 else y.unsqueeze(0)
        if batch.shape[-1] != self.state_dim:
            raise InputError(
                f"Hybrid: the {self.flow.name} flow's ODE state [theta, {self.extra_state.name}] has length "
                f"{self.state_dim}, got {batch.shape[-1]}; build it with model.join(theta, model.initial_extra(theta))."
            )
        lib = self.correction
        if isinstance(lib, LatentCorrection):
            head, z = self.flow_part(batch)
            assert z is not None  # a latent correction's states follow the flow's
            theta = head[:, : self.problem.dim]
            state = StateDerivatives(self.problem, theta, torch.is_grad_enabled() and batch.requires_grad)
            out = self.flow.vector_field(t, state) if self.flow.extra_state is None else self.flow(t, head)
            dtheta, dz = lib.latent_field(t, state, z)
            out = torch.cat([out[:, : self.problem.dim] + dtheta, out[:, self.problem.dim :], dz], dim=1)
        elif isinstance(lib, HiddenStateLibrary):
            out, fields = self.flow.hidden_fields(t, batch, lib.terms)
            own = self.flow.hidden_coefficients()
            for n, c in lib.coefficients(self.flow).items():
                out = out + (c - own[n]) * fields[n]
        else:
            out = self.flow(t, batch)
            if lib is not None:
                theta, extra = self.flow.split(batch)
                out = out + self.flow.join(lib(t, theta), None if extra is None else torch.zeros_like(extra))
        return out if y.dim() == 2 else out[0]

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        out = self.flow.vector_field(t, state)
        return out if self.correction is None else out + self.correction.vector_field(t, state)

    def flow_part(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(flow state, z)`` of ODE states ``y`` ``(..., state_dim)``: the flow's own ``[theta, extra]`` and the
        latent states of a :class:`LatentCorrection` (None for any other correction)."""
        if not isinstance(self.correction, LatentCorrection):
            return y, None
        n = self.flow.state_dim
        return y[..., :n], y[..., n:]

    def initial_extra(self, theta0: Tensor, trajectory: object = None, step: int | None = None) -> Tensor | None:
        """The flow's extra state at ``theta0`` (its measurement in ``trajectory`` at ``step``), then, for a
        :class:`LatentCorrection`, ``z = 0``: nothing is measured about the latent states (``fit`` can fit their
        start per window instead, ``extra_start="fitted"``)."""
        own = self.flow.initial_extra(theta0, trajectory, step)
        if not isinstance(self.correction, LatentCorrection):
            return own
        z = theta0.new_zeros(self.correction.m)
        return z if own is None else torch.cat([own.reshape(-1).to(z), z])

    def rebase(self, y: Tensor) -> Tensor:
        head, z = self.flow_part(y)
        head = self.flow.rebase(head)
        return head if z is None else torch.cat([head, z], dim=-1)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "flow": self.flow.config(),
            "correction": None if self.correction is None else self.correction.config(),
        }
