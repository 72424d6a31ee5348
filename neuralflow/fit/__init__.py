"""Fitting a physics flow plus a learnable correction to GD iterates (stage 5 of the pipeline).

Multiple shooting: every window starts at an observed (or smoothed) iterate ``x_s`` and the
:class:`~neuralflow.corrections.Hybrid` is integrated over ``window`` steps with torchdiffeq, all
windows batched as the rows of one ``(B, d)`` state. The fit minimises

    loss = E  +  min_norm * E_p * mean ||F_a(x_s)||^2 / mean ||F_p(x_s)||^2
    E    = mean_{windows, outputs k} ||theta(t_s + k) - x_{s+k}||^2 / D

``D`` (the *normaliser*) is the mean squared displacement ``||x_{s+k} - x_s||^2`` of the targets
over the same windows and outputs, so an error of 1 is as bad as standing still and numbers are
comparable across problems. The second term is the APHYNITY penalty (Yin et al., ICLR 2021)
on the correction's size relative to the physics field ``F_p`` at the window
starts, weighted by the physics-only error ``E_p`` on the training windows: the physics keeps what
it explains, and the bias on a needed correction is about ``min_norm (||F_a|| / ||F_p||)^2``
relative, on any problem.

A model whose flow carries state beyond ``theta`` (``flow.extra_state``, e.g. a
:class:`~neuralflow.corrections.HiddenStateLibrary` on a flow with an oscillation variance) is integrated on
its whole ODE state ``[theta, extra]``; each window starts from the flow's ``initial_extra`` at the window's
first iterate and step, which reads the trajectory's measurement (``Trajectory.oscillation``) where there is
one; with ``extra_start="fitted"`` every window's start of the extra state is a parameter of its own
(initialised there) fitted with the correction, for runs where nothing is measured. The loss is ``E`` on
``theta``, plus, with ``variance_weight=w > 0``, the measured oscillation variance in log scale:

    loss = E + w * mean_{windows, outputs k: measured} (log s_model - log s_measured)^2

``s_model`` the flow's predicted variance (``flow.predicted_variance``, ``tr X``), ``s_measured`` GD's demodulated
variance along its tracked eigenvectors (``Trajectory.oscillation.variance``), over the outputs where the
measurement is above its floor (:mod:`neuralflow.fit.variance`). Both parts are dimensionless: ``E`` is 1 for
standing still, the variance term 1 for being off by a factor ``e`` everywhere, so ``w = 1`` asks as much of a
factor ``e`` in the variance as of the whole displacement. The window errors stay on ``theta``; the validation
loss, which picks the parameters the fit returns, is the same loss on the validation windows (``E`` plus the
variance part): scored on ``theta`` alone, a fit whose variance part moves the coefficients off a start that
suits ``theta`` would return that start. The APHYNITY term is left out (weight 0): a hidden-state library's
parameters are already the relative revision of the physics' coefficients. A
:class:`~neuralflow.corrections.LatentCorrection` goes the same way: its latent states ``z`` are part of the hybrid's
extra state (``model.extra_state``), starting at 0 in every window or fitted per window.

Gradients come from ``torchdiffeq.odeint_adjoint`` (adjoint parameters = the correction's
parameters, seminorm) or from backpropagation through ``odeint`` (``method="direct"``); LBFGS and
Adam use them. The default optimiser for at most 64 parameters is Gauss-Newton /
Levenberg-Marquardt with the sensitivities ``J`` of the window states to each parameter by finite
differences (one forward solve per parameter, no backward pass). Constant coefficients of a term
library enter the right-hand side linearly, so it converges in a handful of iterations where a
plain LBFGS loop crawls. ``method="regression"`` is the SINDy-style baseline (Brunton et al. 2016): least
squares of a 5-point finite-difference derivative of the targets minus the physics on the
unit-coefficient fields; it is instant, and the default initial guess of the ODE fit. For gated
coefficients it evaluates the fields and the gate inputs once at the targets and fits the gate
networks by full-batch LBFGS over those precomputed tensors (no ODE solve and no eigen-solve in the
loop): the cheap route at the edge of stability, where every right-hand side needs eigen-solves.
"""

from .api import fit, fit_loss, fit_runs
from .options import ShootingOptions
from .regression import CoefficientProfile, coefficient_profile  # noqa: F401
from .result import FitResult, JointFitResult

__all__ = ["fit", "fit_runs", "fit_loss", "coefficient_profile", "FitResult", "JointFitResult", "ShootingOptions"]
