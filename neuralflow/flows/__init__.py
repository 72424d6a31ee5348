"""Physics: ODE models of GD derived from first principles (stage 3 of the pipeline).

Each flow lists, as data, the approximations its derivation made (``flow.approximations``).
Flows are registered by name in :data:`FLOWS` for the command line, checkpoints and reports:
``FLOWS[name](problem, lr, **options)`` builds one, and ``flow.config()`` holds the name and options.
"""

from collections.abc import Callable
from functools import partial

from .base import Approximation, ExtraState, Flow
from .central import CentralFlow, CriticalState, solve_sdcp
from .gradient import GradientFlow
from .modified import ModifiedFlow
from .oscillation import OscillationFlow
from .principal import PrincipalFlow
from .simulate import Comparison, compare, simulate

FLOWS: dict[str, Callable[..., Flow]] = {
    "gradient": GradientFlow,
    "modified1": partial(ModifiedFlow, order=1),
    "modified2": partial(ModifiedFlow, order=2),
    "principal": PrincipalFlow,
    "central": CentralFlow,
    "oscillation": OscillationFlow,
}

__all__ = [
    "Approximation",
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
    "compare",
    "Comparison",
    "FLOWS",
]
