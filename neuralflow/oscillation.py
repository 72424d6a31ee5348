"""GD's period-two oscillation, measured: the experiment-side half of the oscillation flow (science.md 7).

Write GD's iterates as ``theta_k = m_k + (-1)^k x_k``, with ``m`` the time-averaged iterate and ``x`` the
period-two component (Cohen et al., ICLR 2025; Damian, Nichani, Lee, ICLR 2023). Two estimates of ``x``:

* ``e_k = theta_k - m_k = -(theta_{k-1} - 2 theta_k + theta_{k+1}) / 4`` with ``m`` the midpoint process.
  It contains the smooth trajectory's curvature too, about ``-theta''/4``: below the edge of stability
  ``||e_k||^2`` has a floor set by that curvature, which can lie far above a small injected variance, so
  ``||e||^2`` means nothing below that floor (the README's oscillation section, ``benchmarks/oscillation.py``,
  gives the floors measured on the digits runs). Recorded as ``total = ||e_k||^2``.
* the **period-two demodulation** ``x_k ~ (-1)^k d_k``,
  ``d_k = (theta_{k-2} - 4 theta_{k-1} + 6 theta_k - 4 theta_{k+1} + theta_{k+2}) / 16``:
  the fourth difference passes a sign-alternating sequence with gain exactly 1 and suppresses a smooth
  one to ``theta''''/16``, two orders of the step's time scale below ``e``'s floor. The per-direction
  amplitudes ``u_i . d_k`` along the tracked eigenvectors and their sum of squares (the
  **variance**, ``tr(U Sigma U^T)``) are taken from ``d``; this is what is compared with a flow's
  predicted variance ``tr X``.

**The oscillation is established** at step ``k`` when its variance along the tracked eigenvectors is
at least ``ratio^2`` times the squared smoothed step, ``s_k >= (ratio ||m_{k+1} - m_k||)^2``
(``ratio = 0.1``: the oscillation's amplitude is a tenth of how far the time-averaged iterate moves
per step). The same rule (:func:`established`) is applied to GD's measured variance and to a flow's
predicted variance with the flow's own step. The two regimes differ by orders of magnitude (see
``benchmarks/oscillation.py``), so the ratio is not delicate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import FileFormatError, InputError

__all__ = [
    "ESTABLISHED_RATIO",
    "Oscillation",
    "OscillationRecorder",
    "established",
    "first_established",
    "period_two",
    "roundoff_variance",
]

ESTABLISHED_RATIO = 0.1


def established(variance: Tensor, smoothed_step: Tensor, ratio: float = ESTABLISHED_RATIO) -> Tensor:
    """Boolean mask: the oscillation is established where ``variance >= (ratio * smoothed_step)^2``."""
    if not (isinstance(ratio, (int, float)) and ratio > 0):
        raise InputError(f"established: ratio must be a positive number, got {ratio!r}.")
    return variance >= (ratio * smoothed_step) ** 2


def first_established(
    steps: Tensor, variance: Tensor, smoothed_step: Tensor, after: int, ratio: float = ESTABLISHED_RATIO
) -> int | None:
    """First step ``>= after`` at which the oscillation is established (:func:`established`), or None."""
    ok = established(variance, smoothed_step, ratio) & (steps >= after)
    hit = torch.nonzero(ok).flatten()
    return int(steps[hit[0]]) if len(hit) else None


def period_two(iterates: Tensor) -> Tensor:
    """The period-two demodulation ``d_k`` (module docstring) of consecutive iterates ``(T, d)`` at their interior
    steps ``k = 2 .. T - 3``, shape ``(T - 4, d)``; ``d_k = (-1)^k x_k``."""
    x = iterates
    return (x[:-4] - 4 * x[1:-3] + 6 * x[2:-2] - 4 * x[3:-1] + x[4:]) / 16


def roundoff_variance(theta: Tensor) -> float:
    """The variance float round-off injects per step along any direction: ``(u ||theta|| / sqrt(d))^2``.

    Rounding ``theta_{k+1} = theta_k - lr g`` to the working precision perturbs each coordinate by up to
    half an ulp of ``|theta_i|``, i.e. by about ``u |theta_i|`` with ``u`` the unit round-off
    (``finfo.eps / 2``: 1.1e-16 in float64, 6e-8 in float32); the typical coordinate has
    ``|theta_i| ~ ||theta|| / sqrt(d)``, and an isotropic perturbation of that size per coordinate puts the
    same variance on every unit direction (science.md 7). It ignores the round-off of the gradient itself,
    which is smaller by about ``lr ||g|| / ||theta||``.
    """
    u = torch.finfo(theta.dtype).eps / 2
    return float(u * theta.norm() / theta.numel() ** 0.5) ** 2


@dataclass
class Oscillation:
    """GD's measured period-two oscillation at every step (NaN where a step's neighbours are missing).

    ``steps`` (T,); ``amplitude`` (T, k): the demodulated period-two component along each tracked
    eigenvector (``u_i . d_k``, see the module docstring), None when the trajectory recorded no
    eigenvectors; ``variance`` (T,): ``sum_i amplitude_i^2`` (without eigenvectors: ``||d_k||^2`` over
    all directions); ``total`` (T,): ``||theta_k - m_k||^2``, with the smooth curvature's floor;
    ``smoothed_step`` (T,): ``||m_{k+1} - m_k||``.
    """

    steps: Tensor
    amplitude: Tensor | None
    variance: Tensor
    total: Tensor
    smoothed_step: Tensor

    def established(self, ratio: float = ESTABLISHED_RATIO) -> Tensor:
        """Mask of the steps where the oscillation is established (module docstring)."""
        return established(self.variance, self.smoothed_step, ratio)

    def first_established(self, after: int, ratio: float = ESTABLISHED_RATIO) -> int | None:
        """First step ``>= after`` (e.g. the EoS onset) at which the oscillation is established."""
        return first_established(self.steps, self.variance, self.smoothed_step, after, ratio)

    @classmethod
    def from_iterates(cls, steps: Tensor, iterates: Tensor) -> Oscillation:
        """The measurement from consecutive iterates alone (no eigenvectors: ``amplitude`` is None)."""
        nan = torch.full((len(steps),), float("nan"), dtype=iterates.dtype, device=iterates.device)
        total, variance, step = nan.clone(), nan.clone(), nan.clone()
        x = iterates
        if len(x) >= 3:
            total[1:-1] = ((2 * x[1:-1] - x[:-2] - x[2:]) / 4).pow(2).sum(dim=1)
            m = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
            step[1:-2] = (m[1:] - m[:-1]).norm(dim=1)
        if len(x) >= 5:
            variance[2:-2] = period_two(x).pow(2).sum(dim=1)
        return cls(steps, None, variance, total, step)


class OscillationRecorder:
    """Builds the oscillation series during a GD run from its updates, at every step, whatever is stored.

    Call :meth:`update` once per step ``j`` with ``delta_j = theta_{j+1} - theta_j`` and the tracked
    eigenvectors ``U`` (rows) at step ``j`` (or None if none measured yet); it fills row ``j - 1`` of
    ``series["oscillation"]`` (n, k) (demodulated amplitudes along the eigenvectors of that step) and of
    ``series["smoothed_step"]`` (n,) ``||m_{k+1} - m_k||``, and row ``j`` of ``series["oscillation_total"]``
    (n,) ``||theta - m||^2``. Only the last four updates
    and two eigenvector blocks are kept.
    """

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        nan = float("nan")
        self.series = {
            "oscillation": torch.full((n, k), nan, dtype=dtype, device=device),
            "oscillation_total": torch.full((n,), nan, dtype=dtype, device=device),
            "smoothed_step": torch.full((n,), nan, dtype=dtype, device=device),
        }
        self._deltas: deque[Tensor] = deque(maxlen=4)
        self._bases: deque[Tensor | None] = deque(maxlen=2)

    def snapshot(self) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """The last updates and eigenvector blocks (references: the recorder never changes them in place)."""
        return tuple(self._deltas), tuple(self._bases)

    def restore(self, snapshot: tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]) -> None:
        """Back to a :meth:`snapshot`."""
        self._deltas = deque(snapshot[0], maxlen=4)
        self._bases = deque(snapshot[1], maxlen=2)

    @staticmethod
    def to_tensors(snapshot: tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]) -> dict[str, Tensor]:
        """A :meth:`snapshot` as named tensors, for a checkpoint file."""
        deltas, bases = snapshot
        out = {"present": torch.tensor([U is not None for U in bases], dtype=torch.bool)}
        if deltas:
            out["deltas"] = torch.stack(deltas)
        if any(U is not None for U in bases):
            out["bases"] = torch.stack([U for U in bases if U is not None])
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """The snapshot that :meth:`to_tensors` wrote; FileFormatError if the tensors do not fit its layout."""
        deltas = tuple(tensors["deltas"].unbind(0)) if "deltas" in tensors else ()
        stacked = list(tensors["bases"].unbind(0)) if "bases" in tensors else []
        present = tensors["present"].tolist()
        if len(deltas) > 4 or len(present) > 2 or sum(present) != len(stacked):
            raise FileFormatError("the oscillation recorder's state does not fit its layout")
        return deltas, tuple(stacked.pop(0) if p else None for p in present)

    def clear(self, j: int) -> None:
        """Forget what :meth:`update` of step ``j`` wrote (an interrupted step is run again)."""
        n = self.series["smoothed_step"].shape[0]
        if j < n:
            self.series["oscillation_total"][j] = float("nan")
        if 1 <= j <= n:
            self.series["smoothed_step"][j - 1] = float("nan")
            self.series["oscillation"][j - 1] = float("nan")

    def update(self, j: int, delta: Tensor, U: Tensor | None) -> None:
        self._deltas.append(delta)
        self._bases.append(U)
        D = list(self._deltas)
        k = j - 1  # the step whose neighbours are now all known
        if len(D) >= 2:  # e_k = (Delta_{k-1} - Delta_k) / 4 needs steps k-1..k+1
            self.series["oscillation_total"][j] = ((D[-2] - D[-1]) / 4).pow(2).sum()
        if len(D) >= 3:
            self.series["smoothed_step"][k] = ((D[-3] + 2 * D[-2] + D[-1]) / 4).norm()
        if len(D) == 4:  # d_k = (-Delta_{k-2} + 3 Delta_{k-1} - 3 Delta_k + Delta_{k+1}) / 16
            U_k = self._bases[0]  # the eigenvectors at step k = j - 1
            if U_k is not None:
                d = (-D[0] + 3 * D[1] - 3 * D[2] + D[3]) / 16
                self.series["oscillation"][k] = U_k @ d
