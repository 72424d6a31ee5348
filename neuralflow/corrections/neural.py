"""Free-form corrections: a network of the state (:class:`NeuralCorrection`) and an augmented neural ODE with latent
states (:class:`LatentCorrection`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..autodiff import StateDerivatives
from ..errors import InputError
from ..flows.approximations import (
    Approximation,
)
from ..flows.base import ExtraState
from ..problems import Problem, check_positive_int
from .terms import FEATURES, TERMS, Correction, _check_names, _Context, _Factory, _feature_matrix


def _check_inputs(who: str, problem: Problem, features: str, feature_names: Sequence[str]) -> tuple[list[str], int]:
    """A network's input: ``theta`` (``features="state"``) or the named scalar :data:`FEATURES`; the checked names
    and the input width."""
    if features not in ("state", "features"):
        raise InputError(f"{who}: features must be 'state' or 'features', got {features!r}.")
    names = _check_names(feature_names, FEATURES, "feature")
    return names, problem.dim if features == "state" else len(names)


def _network_input(correction: NeuralCorrection | LatentCorrection, state: StateDerivatives, ctx: _Context) -> Tensor:
    """The network's input on ``state``: ``theta`` or the feature matrix, with or without its graph as asked."""
    if correction.inputs == "state":
        return state.out(state.thetas)
    return state.out(_feature_matrix(ctx, correction.feature_names))


class NeuralCorrection(Correction):
    """Free-form correction ``F_a(theta) = lr * MLP(x)`` for low-dimensional problems.

    ``features="state"``: ``x = theta`` (``d`` inputs); ``features="features"``: ``x`` = the
    scalar state features of :data:`FEATURES` (then ``F_a`` depends on ``theta`` only through
    them). Two tanh hidden layers of width ``hidden``; the output layer starts at 0, so the
    model starts as the physics alone (the universal differential equations of Rackauckas et al. 2020).

    Parameters
    ----------
    problem : Problem
        The loss GD runs on.
    lr : float
        GD's step size.
    features : str, default "state"
        What the network reads (stored as ``inputs``): ``"state"`` (``theta``) or ``"features"`` (the
        ``feature_names``).
    hidden : int, default 64
        Width of the two hidden layers.
    feature_names : sequence of str, default ("lr_S_minus_2", "lr_S", "loss")
        Names from :data:`FEATURES`, read with ``features="features"``.
    seed : int, default 0
        Seed of the network's initialisation (the global generator is left as it was).
    max_critical : int, default 4
        At most this many eigenvalues count as critical (``>= 1.95 / lr``) in the terms and features that sum
        over them (``gradScrit``, ``sigma2``).
    eig_tol : float, default 1e-6
        LOBPCG's relative residual for the top eigenpairs the terms and features need.

    Raises
    ------
    InputError
        On ``features`` other than ``"state"`` or ``"features"``, an unknown feature name, or a non-positive
        ``hidden`` or ``max_critical``.
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
        self.feature_names, n_in = _check_inputs("NeuralCorrection", problem, features, feature_names)
        check_positive_int(hidden, "hidden")
        self.inputs = features
        self.hidden = hidden
        self.seed = seed
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
        return self.lr * self.net(_network_input(self, state, _Context(self, state)))

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
        check_positive_int(m, "LatentCorrection: m (the number of latent states)")
        check_positive_int(hidden, "LatentCorrection: hidden")
        self.feature_names, n_in = _check_inputs("LatentCorrection", problem, features, feature_names)
        if not isinstance(direct, bool):
            raise InputError(f"LatentCorrection: direct must be True or False, got {direct!r}.")
        self.fields = _check_names(fields, TERMS, "term")
        if not self.fields and not direct:
            raise InputError(
                "LatentCorrection: the latent states must reach dtheta/dt; name fields=[...] (e.g. "
                "['g']) or pass direct=True."
            )
        self.m, self.hidden, self.inputs, self.direct, self.seed = m, hidden, features, direct, seed
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
        return ExtraState(
            "latent",
            "z",
            (self.m,),
            f"{self.m} latent state(s) of the neural correction, with learned dynamics and no measurement",
        )

    @property
    def approximations(self) -> tuple[Approximation, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(TERMS[n].approximation for n in self.fields))

    def state_features(self, state: StateDerivatives) -> Tensor:
        """The scalar state features :attr:`feature_names` at ``state.thetas``, ``(B, F)`` (the report's formulas of
        the read-out coefficients are written in them)."""
        return _feature_matrix(_Context(self, state), self.feature_names)

    def latent_field(self, t: Tensor, state: StateDerivatives, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(F_a, dz/dt)`` on states ``state.thetas`` ``(B, d)`` with latent states ``z`` ``(B, m)``."""
        if z.dim() != 2 or z.shape != (state.thetas.shape[0], self.m):
            raise InputError(
                f"LatentCorrection: expected latent states of shape ({state.thetas.shape[0]}, {self.m}), "
                f"got {tuple(z.shape)}."
            )
        ctx = _Context(self, state)
        dz = self.lr * self.net(torch.cat([_network_input(self, state, ctx), z], dim=1))
        out = torch.zeros_like(state.thetas) if not self.direct else self.lr * z @ self.force.T
        if self.fields:
            coeffs = z @ self.readout.T  # (B, K): each field's coefficient (W z)_j
            for j, n in enumerate(self.fields):
                out = out + coeffs[:, j : j + 1] * state.out(TERMS[n](ctx))
        return out, dz

    def vector_field(self, t: Tensor, state: StateDerivatives) -> Tensor:
        raise InputError(
            "a LatentCorrection carries latent states of its own; use it inside "
            "nf.Hybrid(flow, correction), whose ODE state is [theta, flow extra state (if any), z]."
        )

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
