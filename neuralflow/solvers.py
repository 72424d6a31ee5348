"""The ODE solvers neuralflow integrates with (torchdiffeq's methods), shared by the fit and the report.

Fixed-grid methods take a ``step_size`` (in GD steps); adaptive ones take ``rtol`` and ``atol``.
"""

from __future__ import annotations

__all__ = ["FIXED_GRID", "ADAPTIVE"]

#: torchdiffeq's fixed-grid methods (they take ``options={"step_size": h}``).
FIXED_GRID = ("rk4", "euler", "midpoint", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams")
#: torchdiffeq's adaptive methods (they take ``rtol`` and ``atol``).
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
