"""The multiple-shooting windows: where each starts, its targets, training and validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..trajectory import Trajectory


@dataclass
class _Windows:
    t: Tensor  # (n_out + 1,) step times relative to the window start
    steps: Tensor  # (W,) step of each window start
    targets: Tensor  # (n_out + 1, W, d); targets[0] are the starting states
    train: Tensor  # indices of training windows
    val: Tensor  # indices of validation windows
    normaliser: float


def _make_windows(
    targets: Trajectory,
    window: int,
    stride: int,
    val_fraction: float,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    exclude: Sequence[Sequence[int]] = (),
) -> _Windows:
    every = targets.store_every
    if window % every:
        raise InputError(
            f"fit: window={window} steps is not a multiple of the recording interval ({every} steps); "
            f"choose a multiple of {every}."
        )
    if stride % every:
        raise InputError(f"fit: stride={stride} steps is not a multiple of the recording interval ({every} steps).")
    n_out, hop = window // every, stride // every
    T = len(targets)
    if T < n_out + 1:
        raise InputError(
            f"fit: the trajectory holds {T} stored iterates (steps {int(targets.steps[0])}..{int(targets.steps[-1])}) "
            f"but a window of {window} steps needs {n_out + 1}; use a smaller window or a longer run."
        )
    x = targets.iterates.to(dtype=dtype, device=device)
    starts = torch.arange(0, T - n_out, hop, device=device)
    first = targets.steps.to(device)[starts]
    kept = torch.ones(len(starts), dtype=torch.bool, device=device)
    reach = 3 * every  # the regression's 5-point stencil on smoothed targets reads GD steps up to 3 away
    for lo, hi in exclude:  # a window spans steps [first, first + window]; drop it if it comes near [lo, hi)
        kept &= (first + window + reach < lo) | (first - reach >= hi)
    if not bool(kept.any()):
        raise InputError(f"fit: exclude={list(exclude)} removes every window; exclude less of the trajectory.")
    starts = starts[kept]
    idx = starts[None, :] + torch.arange(n_out + 1, device=device)[:, None]
    tgt = x[idx]
    n = len(starts)
    if not 0 <= val_fraction < 1:
        raise InputError(f"fit: val_fraction must be in [0, 1), got {val_fraction!r}.")
    n_val = min(int(round(val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    disp = (tgt[1:] - tgt[:1]).square().sum(-1).mean()
    if not disp > 0:
        raise InputError("fit: the targets do not move within the windows; there is nothing to fit.")
    t = torch.arange(0, window + 1, every, dtype=dtype, device=device)
    return _Windows(t, targets.steps.to(device)[starts], tgt, train, val, float(disp))
