"""Physics: ODE models of GD derived from first principles (stage 3 of the pipeline).

Each flow lists, as data, the approximations its derivation made (``flow.approximations``; every record lives
in :mod:`neuralflow.flows.approximations`), and writes its right-hand side in LaTeX (``Flow.latex``).
Flows are registered by name in :data:`FLOWS` for the command line, checkpoints and reports:
``FLOWS[name](problem, lr, **options)`` builds one, and ``flow.config()`` holds the name and options.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

from ..problems import Problem
from ..trajectory import Trajectory
from .approximations import APPROXIMATIONS, Approximation
from .base import ExtraState, Flow
from .central import CentralFlow, CriticalState, solve_sdcp
from .gradient import GradientFlow
from .modified import ModifiedFlow
from .oscillation import OscillationFlow
from .principal import PrincipalFlow
from .simulate import simulate

FLOWS: dict[str, Callable[..., Flow]] = {
    "gradient": GradientFlow,
    "modified1": partial(ModifiedFlow, order=1),
    "modified2": partial(ModifiedFlow, order=2),
    "principal": PrincipalFlow,
    "central": CentralFlow,
    "oscillation": OscillationFlow,
    "oscillation1": partial(OscillationFlow, order=1),
}


def _entry(name: str) -> tuple[type[Flow], dict[str, Any]]:
    """The class and the fixed constructor options of the registered flow ``name``."""
    entry = FLOWS[name]
    flow_class, fixed = (entry.func, dict(entry.keywords)) if isinstance(entry, partial) else (entry, {})
    if not (isinstance(flow_class, type) and issubclass(flow_class, Flow)):
        raise TypeError(f"FLOWS[{name!r}] must be a Flow class, perhaps with options bound by functools.partial.")
    return flow_class, fixed


def for_run(name: str, problem: Problem, trajectory: Trajectory, **options: object) -> Flow:
    """``FLOWS[name]`` for a recorded run (:meth:`Flow.from_trajectory`): at its ``lr``, and for the oscillation
    flow with the run's injected noise as ``q``; ``options`` go to the constructor and win."""
    cls, fixed = _entry(name)
    return cls.from_trajectory(problem, trajectory, **{**fixed, **options})


def flow_latex(name: str) -> str | None:
    """The right-hand side of the registered flow ``name`` in LaTeX (:attr:`Flow.latex`); None for a name that
    is not in :data:`FLOWS`."""
    if name not in FLOWS:
        return None
    cls, fixed = _entry(name)
    return cls.latex_of(**fixed)


__all__ = [
    "Approximation",
    "APPROXIMATIONS",
    "Flow",
    "ExtraState",
    "OscillationFlow",
    "GradientFlow",
    "ModifiedFlow",
    "PrincipalFlow",
    "CentralFlow",
    "CriticalState",
    "solve_sdcp",
    "simulate",
    "FLOWS",
    "for_run",
    "flow_latex",
]


def __getattr__(name: str) -> object:
    """``compare`` and ``Comparison`` live in :mod:`neuralflow.compare` (analysis, above the physics); the old
    ``neuralflow.flows.compare`` path still works."""
    if name in ("compare", "Comparison"):
        from ..compare import Comparison, compare

        return {"compare": compare, "Comparison": Comparison}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
