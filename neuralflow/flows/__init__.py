"""Physics: ODE models of GD derived from first principles (stage 3 of the pipeline).

Each flow lists, as data, the approximations its derivation made (``flow.approximations``).
Flows are registered by name in :data:`FLOWS` for the command line, checkpoints and reports.
"""

from .base import Approximation, Flow
from .gradient import GradientFlow

FLOWS: dict[str, type[Flow]] = {
    "gradient": GradientFlow,
}

__all__ = ["Approximation", "Flow", "GradientFlow", "FLOWS"]
