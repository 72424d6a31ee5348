"""neuralflow: physics-style effective ODEs of gradient descent, with learnable corrections.

Pipeline (see the README): Problem --run_gd--> Trajectory --> flows (physics) + corrections --> fit
--> report, with safe checkpoints. The names below are the curated top level (``nf.GradientFlow``,
``nf.TermLibrary``, ``nf.fit``, ``nf.save``, ...); the stage packages (``nf.problems``, ``nf.flows``,
``nf.corrections``, ...) hold the rest.
"""

from . import autodiff, corrections, flows, problems  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .compare import Comparison, compare  # noqa: E402
from .corrections import (  # noqa: E402
    TERMS,
    HiddenStateLibrary,
    Hybrid,
    LatentCorrection,
    NeuralCorrection,
    TermLibrary,
)
from .errors import DivergenceError, EngineError, FileFormatError, InputError, Interrupted, NeuralflowError  # noqa: E402,E501
from .fit import FitResult, JointFitResult, coefficient_profile, fit, fit_runs  # noqa: E402
from .flows import (  # noqa: E402
    FLOWS,
    Approximation,
    CentralFlow,
    Flow,
    GradientFlow,
    ModifiedFlow,
    OscillationFlow,
    PrincipalFlow,
)
from .flows.simulate import simulate  # noqa: E402
from .gd import run_gd  # noqa: E402
from .ladder import Ladder, ladder  # noqa: E402
from .problems import Problem  # noqa: E402
from .provenance import __version__  # noqa: E402
from .report import Report, build_report  # noqa: E402
from .solvers import Solver  # noqa: E402
from .stability import Stability, stability  # noqa: E402
from .sweep import sweep  # noqa: E402
from .trajectory import Trajectory  # noqa: E402

__all__ = [
    "__version__",
    # stage packages
    "autodiff",
    "problems",
    "flows",
    "corrections",
    # problem and experiment
    "Problem",
    "run_gd",
    "Trajectory",
    # physics
    "Flow",
    "FLOWS",
    "GradientFlow",
    "ModifiedFlow",
    "PrincipalFlow",
    "CentralFlow",
    "OscillationFlow",
    "Approximation",
    "Solver",
    "simulate",
    "compare",
    "Comparison",
    # corrections
    "TERMS",
    "TermLibrary",
    "NeuralCorrection",
    "HiddenStateLibrary",
    "LatentCorrection",
    "Hybrid",
    # fit and explain
    "fit",
    "fit_runs",
    "coefficient_profile",
    "FitResult",
    "JointFitResult",
    "Report",
    "build_report",
    "ladder",
    "Ladder",
    "stability",
    "Stability",
    # persist and scale
    "save",
    "load",
    "sweep",
    # errors
    "NeuralflowError",
    "InputError",
    "DivergenceError",
    "FileFormatError",
    "EngineError",
    "Interrupted",
]
