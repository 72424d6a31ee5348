"""Networks on scikit-learn's bundled digits: a fully connected net and a small convolutional one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from .core import Problem, from_module

_ACTIVATIONS: dict[str, tuple[type[torch.nn.Module], bool]] = {
    # name -> (module, has smooth third derivatives)
    "tanh": (torch.nn.Tanh, True),
    "gelu": (torch.nn.GELU, True),
    "softplus": (torch.nn.Softplus, True),
    "sigmoid": (torch.nn.Sigmoid, True),
    "relu": (torch.nn.ReLU, False),
}


def _digits(
    n: int, dtype: torch.dtype, device: torch.device | str | None, who: str = "mlp_digits", images: bool = False
) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    if not isinstance(n, int) or not 1 <= n <= len(data.target):
        raise InputError(f"{who}: n must be an int in [1, {len(data.target)}], got {n!r}.")
    pixels = data.images[:n, None] if images else data.data[:n]
    x = torch.as_tensor(pixels / 16.0, dtype=dtype, device=device)
    y = torch.nn.functional.one_hot(torch.as_tensor(data.target[:n]), 10).to(dtype=dtype, device=device)
    return x, y


def _activation(name: str, who: str) -> tuple[type[torch.nn.Module], bool]:
    """The activation's module class and whether it is smooth enough for third derivatives."""
    if name not in _ACTIVATIONS:
        raise InputError(f"{who}: unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def mlp_digits(
    n: int = 1000,
    widths: Sequence[int] = (64, 64),
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> Problem:
    """A fully connected net on scikit-learn's bundled digits, the EoS set-up of Cohen et al. 2021.

    First ``n`` examples, inputs / 16, one-hot targets, loss ``0.5 ||f(x) - y||^2`` averaged over
    examples. The net is ``Sequential(Linear(64, w1), act, ..., Linear(wk, 10))`` built in float64 on
    the CPU right after ``torch.manual_seed(seed)`` with PyTorch's default initialisation, then cast to
    ``dtype`` and moved to ``device``: the same seed gives the same net, up to rounding, in every dtype and
    on every device (a float32 run against a float64 one compares round-off, not two nets). The flat
    vector follows ``named_parameters()`` order.

    Parameters
    ----------
    n : int, default 1000
        How many of the 1797 digits to use (the first ``n``).
    widths : sequence of int, default (64, 64)
        The hidden layers' widths.
    activation : str, default "tanh"
        ``"tanh"``, ``"gelu"``, ``"softplus"``, ``"sigmoid"`` or ``"relu"`` (not smooth: no flow that needs
        Hessians or third derivatives applies).
    seed : int, default 0
        The seed of the initialisation.
    dtype : torch.dtype, default torch.float64
        The parameters' and the data's dtype.
    device : torch.device or str, optional
        Where the parameters and the data live; None: the CPU.
    batch_size : int, optional
        Split the data into parts of at most this many examples (the loss is unchanged); None: one part.

    Returns
    -------
    Problem
        The loss over one flat parameter vector, with its initial point ``theta0``.

    Raises
    ------
    InputError
        On an unknown activation, a non-positive width or ``n`` outside ``[1, 1797]``.

    Examples
    --------
    >>> import neuralflow as nf
    >>> problem = nf.problems.mlp_digits(n=100, widths=(8,))
    >>> problem.dim
    610
    """
    act, smooth = _activation(activation, "mlp_digits")
    widths = tuple(int(w) for w in widths)
    if any(w < 1 for w in widths):
        raise InputError(f"mlp_digits: widths must be positive, got {widths}.")
    x, y = _digits(n, dtype, device)
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    sizes = (64, *widths)
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [torch.nn.Linear(a, b, dtype=torch.float64), act()]
    layers.append(torch.nn.Linear(sizes[-1], 10, dtype=torch.float64))
    net = torch.nn.Sequential(*layers).to(dtype=dtype, device=device)
    problem = from_module(net, x, y, loss="mse", batch_size=batch_size)
    problem.name = "mlp-digits"
    problem.description = {
        "name": "mlp-digits",
        "n": n,
        "widths": list(widths),
        "activation": activation,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
    }
    problem.thrice_differentiable = problem.twice_differentiable = smooth
    return problem


def cnn_digits(
    n: int = 500,
    channels: Sequence[int] = (8, 8),
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> Problem:
    """A small convolutional net on the digits as 8x8 images (one channel, pixels / 16), MSE on one-hot targets.

    ``Conv2d(1, c1, 3, padding=1), act, Conv2d(c1, c2, 3, stride=2, padding=1), act, Flatten,
    Linear(16 c2, 10)``: the 8x8 image is halved to 4x4 by the strided layer. Built like
    :func:`mlp_digits` (``torch.manual_seed(seed)``, PyTorch's default initialisation in float64 on the CPU,
    then cast to ``dtype`` and moved to ``device``). The architecture family of the central-flow experiments
    (Cohen et al. 2025 train CNNs on CIFAR), small enough for third derivatives on a CPU.

    Parameters
    ----------
    n : int, default 500
        How many of the 1797 digits to use (the first ``n``).
    channels : sequence of two int, default (8, 8)
        The channels ``(c1, c2)`` of the two convolutions.
    activation : str, default "tanh"
        As in :func:`mlp_digits`.
    seed : int, default 0
        The seed of the initialisation.
    dtype : torch.dtype, default torch.float64
        The parameters' and the data's dtype.
    device : torch.device or str, optional
        Where the parameters and the data live; None: the CPU.
    batch_size : int, optional
        Split the data into parts of at most this many examples (the loss is unchanged); None: one part.

    Returns
    -------
    Problem
        The loss over one flat parameter vector, with its initial point ``theta0``.

    Raises
    ------
    InputError
        On an unknown activation, channels that are not two positive ints, or ``n`` outside ``[1, 1797]``.
    """
    act, smooth = _activation(activation, "cnn_digits")
    channels = tuple(int(c) for c in channels)
    if len(channels) != 2 or any(c < 1 for c in channels):
        raise InputError(f"cnn_digits: channels must be two positive ints (c1, c2), got {channels}.")
    x, y = _digits(n, dtype, device, "cnn_digits", images=True)
    torch.manual_seed(seed)
    f64 = torch.float64
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, channels[0], 3, padding=1, dtype=f64),
        act(),
        torch.nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1, dtype=f64),
        act(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * channels[1], 10, dtype=f64),
    ).to(dtype=dtype, device=device)
    problem = from_module(net, x, y, loss="mse", batch_size=batch_size)
    problem.name = "cnn-digits"
    problem.description = {
        "name": "cnn-digits",
        "n": n,
        "channels": list(channels),
        "activation": activation,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
    }
    problem.thrice_differentiable = problem.twice_differentiable = smooth
    return problem
