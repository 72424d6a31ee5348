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

from ..flows.approximations import EFFECTIVE_STEP_SIZE, NO_OSCILLATION_CRITICAL, SLAVED_TOP_DIRECTION
from .hidden import HIDDEN_TERMS, HiddenStateLibrary, HiddenTermSpec, lag_theory
from .hybrid import CORRECTIONS, Hybrid
from .library import Inspection, RegressionInputs, TermLibrary
from .neural import LatentCorrection, NeuralCorrection
from .terms import FEATURES, TERMS, Correction, FeatureSpec, TermSpec

__all__ = [
    "TermSpec",
    "TERMS",
    "FeatureSpec",
    "FEATURES",
    "Correction",
    "TermLibrary",
    "Inspection",
    "RegressionInputs",
    "NeuralCorrection",
    "HiddenTermSpec",
    "HIDDEN_TERMS",
    "HiddenStateLibrary",
    "lag_theory",
    "LatentCorrection",
    "Hybrid",
    "CORRECTIONS",
    "EFFECTIVE_STEP_SIZE",
    "NO_OSCILLATION_CRITICAL",
    "SLAVED_TOP_DIRECTION",
]
