"""Small problems of known structure: closed-form losses of two or a few parameters, and a tiny LSTM on
generated sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .core import Problem, _as_tensor, _dtype_entry, check_positive_int, from_module


def zhu_quartic(
    theta0: Sequence[float] = (3.2, 0.3),
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Problem:
    """``L(x, y) = 1/4 (x^2 y^2 - 1)^2`` (Zhu et al., ICLR 2023).

    On the minimum set ``xy = 1`` the sharpness is ``2 (x^2 + y^2) >= 4``; with ``lr = 0.2`` from
    the default initialisation GD enters the edge of stability.

    Parameters
    ----------
    theta0 : sequence of two float, default (3.2, 0.3)
        The initial point ``(x, y)``.
    dtype : torch.dtype, default torch.float64
        The parameters' and the data's dtype.
    device : torch.device or str, optional
        Where the parameters and the data live; None: the CPU.

    Returns
    -------
    Problem
        The loss over one flat parameter vector, with its initial point ``theta0``.

    Raises
    ------
    InputError
        When ``theta0`` does not have two entries.
    """
    x0 = _as_tensor(theta0, dtype, device)
    if x0.shape != (2,):
        raise InputError(f"zhu_quartic: theta0 must have 2 entries, got shape {tuple(x0.shape)}.")
    return Problem(
        "zhu-quartic",
        x0,
        [lambda th: 0.25 * (th[0] ** 2 * th[1] ** 2 - 1) ** 2],
        {"theta0": x0.tolist(), **_dtype_entry(dtype)},
    )


def scalar_factorization(
    depth: int = 3,
    theta0: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Problem:
    """``L(x) = 1/2 (prod_i x_i - 1)^2`` over ``depth`` scalars.

    Its flattest minimum (all ``x_i = 1``) has sharpness ``depth``. ``theta0`` defaults to
    ``depth`` values evenly spaced in ``[0.5, 1.5]``.
    """
    if not isinstance(depth, int) or depth < 1:
        raise InputError(f"scalar_factorization: depth must be a positive int, got {depth!r}.")
    if theta0 is None:
        x0 = torch.linspace(0.5, 1.5, depth, dtype=dtype, device=device)
    else:
        x0 = _as_tensor(theta0, dtype, device)
    if x0.shape != (depth,):
        raise InputError(f"scalar_factorization: theta0 must have {depth} entries, got {tuple(x0.shape)}.")
    return Problem(
        "scalar-factorization",
        x0,
        [lambda th: 0.5 * (torch.prod(th) - 1) ** 2],
        {"depth": depth, "theta0": x0.tolist(), **_dtype_entry(dtype)},
    )


class _LastStepLSTM(torch.nn.Module):
    """An LSTM read out by a linear layer at its last time step: ``(n, T, 1) -> (n, 1)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(1, hidden, batch_first=True, dtype=torch.float64)
        self.readout = torch.nn.Linear(hidden, 1, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.readout(out[:, -1])


def lstm_recall(
    n: int = 128,
    length: int = 8,
    hidden: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Problem:
    """A tiny LSTM that must recall the first entry of a generated sequence, MSE.

    Inputs ``x`` are ``n`` sequences of ``length`` standard normal numbers (generated from ``seed``),
    the target is ``x[:, 0]``: the net has to carry one number through ``length - 1`` steps of its
    memory. ``LSTM(1, hidden)`` read out by ``Linear(hidden, 1)`` at the last step, initialised by
    PyTorch after ``torch.manual_seed(seed)`` in float64 on the CPU, then cast and moved. Smooth (sigmoid and
    tanh gates), so every flow applies.

    Parameters
    ----------
    n : int, default 128
        How many sequences (at most 100000).
    length : int, default 8
        The sequences' length (at most 1000).
    hidden : int, default 8
        The LSTM's hidden size (at most 4096).
    seed : int, default 0
        The seed of the data and of the initialisation.
    dtype : torch.dtype, default torch.float64
        The parameters' and the data's dtype.
    device : torch.device or str, optional
        Where the parameters and the data live; None: the CPU.

    Returns
    -------
    Problem
        The loss over one flat parameter vector, with its initial point ``theta0``.

    Raises
    ------
    InputError
        When ``n``, ``length`` or ``hidden`` is not a positive int within its limit.
    """
    for name, value, most in (("n", n, 100_000), ("length", length, 1000), ("hidden", hidden, 4096)):
        if check_positive_int(value, f"lstm_recall: {name}") > most:
            raise InputError(
                f"lstm_recall: {name} must be at most {most} (the limits a saved run is checked against), got {value}."
            )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 1, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    torch.manual_seed(seed)
    net = _LastStepLSTM(hidden).to(dtype=dtype, device=device)  # built in float64 on the CPU, as mlp_digits
    problem = from_module(net, x, x[:, 0].clone(), loss="mse")
    problem.name = "lstm-recall"
    problem.description = {
        "name": "lstm-recall",
        "n": n,
        "length": length,
        "hidden": hidden,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return problem
