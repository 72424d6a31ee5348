"""The fit loss's variance part: the flow's predicted oscillation variance against GD's measured one, in log scale.

    loss = E + w * mean_{windows, outputs k: measured} (log s_model - log s_measured)^2

(the package docstring says how the two parts are weighted).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..corrections import Hybrid
from ..errors import InputError
from ..trajectory import Trajectory
from .windows import _Windows

# the demodulated variance counts where it exceeds (this * ||m_{k+1} - m_k||)^2: below the edge on the digits runs
# it sits at ratios 2e-8 to 6e-8, where the injected noise's own equilibrium q / (2 |r|) explains it
_VARIANCE_FLOOR_RATIO = 1e-8


def _variance_term(
    model: Hybrid, trajectory: Trajectory, win: _Windows, weight: float
) -> tuple[float, Tensor, Tensor] | None:
    """The loss's variance part: ``(weight, log s_measured, mask)`` at every window output, or None for weight 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
        raise InputError(f"fit: variance_weight must be a non-negative number, got {weight!r}.")
    if weight == 0:
        return None
    if not hasattr(model.flow, "predicted_variance"):
        raise InputError(
            f"fit: variance_weight compares a flow's predicted oscillation variance with GD's, but the "
            f"{model.flow.name} flow predicts none; use the oscillation flow or variance_weight=0."
        )
    log_s, mask = _measured_log_variance(trajectory, win)
    if not bool(mask.any()):
        raise InputError(
            "fit: the trajectory has no measured oscillation variance above its floor in the windows; "
            "record it with run_gd (n_eigs >= 1) or pass variance_weight=0."
        )
    return float(weight), log_s, mask


def _measured_log_variance(trajectory: Trajectory, win: _Windows) -> tuple[Tensor, Tensor]:
    """GD's measured ``log s`` at every window output ``(n_out + 1, W)`` and where it counts: finite and at least
    ``(_VARIANCE_FLOOR_RATIO ||m_{k+1} - m_k||)^2`` (the demodulation's floor, :mod:`neuralflow.oscillation`)."""
    osc = trajectory.oscillation
    steps = (win.steps[None, :] + win.t[:, None].round().long()).cpu()
    row = torch.searchsorted(osc.steps, steps.clamp(max=int(osc.steps[-1])))
    found = osc.steps[row] == steps
    s, step = osc.variance[row], osc.smoothed_step[row]
    mask = found & torch.isfinite(s) & torch.isfinite(step) & (s > 0) & (s >= (_VARIANCE_FLOOR_RATIO * step) ** 2)
    log_s = torch.log(torch.where(mask, s, 1.0))
    device, dtype = win.targets.device, win.targets.dtype
    return log_s.to(device=device, dtype=dtype), mask.to(device)
