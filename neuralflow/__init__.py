"""neuralflow: physics-style effective ODEs of gradient descent, with learnable corrections.

Pipeline (see the README): Problem --run_gd--> Trajectory --> flows (physics) + corrections --> fit
--> report, with safe checkpoints.
"""

from . import autodiff, corrections, flows, problems  # noqa: E402
from .checkpoint import load  # noqa: E402
from .compare import compare  # noqa: E402
from .corrections import Hybrid  # noqa: E402
from .errors import DivergenceError, EngineError, FileFormatError, InputError, Interrupted, NeuralflowError  # noqa: E402,E501
from .fit import FitResult, JointFitResult, coefficient_profile, fit  # noqa: E402
from .flows import Approximation, OscillationFlow  # noqa: E402
from .flows.simulate import simulate  # noqa: E402
from .gd import run_gd  # noqa: E402
from .ladder import ladder  # noqa: E402
from .problems import Problem  # noqa: E402
from .provenance import __version__  # noqa: E402
from .report import Report  # noqa: E402
from .stability import Stability, stability  # noqa: E402
from .sweep import sweep  # noqa: E402
from .trajectory import Trajectory  # noqa: E402

__all__ = [
    "__version__",
    "autodiff",
    "flows",
    "corrections",
    "Hybrid",
    "fit",
    "coefficient_profile",
    "FitResult",
    "JointFitResult",
    "problems",
    "Approximation",
    "OscillationFlow",
    "simulate",
    "compare",
    "Problem",
    "run_gd",
    "Trajectory",
    "Report",
    "load",
    "ladder",
    "sweep",
    "EngineError",
    "stability",
    "Stability",
    "NeuralflowError",
    "InputError",
    "DivergenceError",
    "FileFormatError",
    "Interrupted",
]
