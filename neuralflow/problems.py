"""Problems: a full-batch loss over one flat parameter vector, and its initial point.

Stage 1 of the pipeline (see the README). A :class:`Problem` is what GD runs on and what every flow
differentiates. Its loss is a sum of *parts* (data chunks of at most ``batch_size`` examples,
weighted so that they add up to the full-batch mean), so a large data set never needs one huge
forward pass; the derivatives in :mod:`neuralflow.autodiff` accumulate over the parts.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._validate import DTYPES, MAX_PARAMS, check_max_params, check_positive_finite, check_problem_description
from .errors import InputError

LossFn = Callable[[Tensor], Tensor]

__all__ = [
    "Problem",
    "quadratic",
    "zhu_quartic",
    "scalar_factorization",
    "mlp_digits",
    "cnn_digits",
    "lstm_recall",
    "from_module",
    "from_file",
    "from_function",
    "PROBLEMS",
    "make",
]


@dataclass(eq=False)
class Problem:
    """A loss ``L(theta)`` over a flat parameter vector and an initial point ``theta0``.

    ``parts`` are callables ``theta -> 0-dim tensor`` whose sum is ``L``. ``description`` is a
    JSON-able dict that names the problem and how to rebuild it (saved with every trajectory).
    """

    name: str
    theta0: Tensor
    parts: list[LossFn]
    description: dict[str, Any] = field(default_factory=dict)
    twice_differentiable: bool = True
    thrice_differentiable: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.theta0, Tensor) or self.theta0.dim() != 1 or self.theta0.numel() == 0:
            raise InputError(
                f"problem {self.name!r}: theta0 must be a non-empty 1-D tensor, got "
                f"{type(self.theta0).__name__} of shape {tuple(getattr(self.theta0, 'shape', ()))}; "
                "flatten the parameters into one vector."
            )
        if not self.theta0.is_floating_point():
            raise InputError(
                f"problem {self.name!r}: theta0 has dtype {self.theta0.dtype}; pass a floating "
                "tensor (float64 is recommended for anything involving third derivatives)."
            )
        if self.theta0.dtype not in (torch.float64, torch.float32):
            raise InputError(
                f"problem {self.name!r}: theta0 has dtype {self.theta0.dtype}; neuralflow needs float64 (recommended) "
                "or float32: Hessian eigen-solves and third derivatives break down in half precision."
            )
        if not torch.isfinite(self.theta0).all():
            raise InputError(f"problem {self.name!r}: theta0 contains NaN or inf values.")
        self.theta0 = self.theta0.detach()
        self.description = {"name": self.name, **self.description}
        value = self.loss(self.theta0)
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise InputError(
                f"problem {self.name!r}: the loss must return a 0-dim tensor, got "
                f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}; reduce it "
                "with .sum() or .mean()."
            )
        if not torch.isfinite(value):
            raise InputError(f"problem {self.name!r}: the loss at theta0 is {value.item()}.")

    @property
    def dim(self) -> int:
        """Number of parameters ``d``."""
        return self.theta0.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.theta0.dtype

    @property
    def device(self) -> torch.device:
        return self.theta0.device

    def loss(self, theta: Tensor) -> Tensor:
        """Full-batch loss ``L(theta)`` of one parameter vector (a 0-dim tensor)."""
        total = self.parts[0](theta)
        for part in self.parts[1:]:
            total = total + part(theta)
        return total

    def batched_loss(self, thetas: Tensor) -> Tensor:
        """``L`` of each row of a ``(B, d)`` tensor, shape ``(B,)``; differentiable."""
        try:
            return torch.func.vmap(self.loss)(thetas)
        except (RuntimeError, ValueError, NotImplementedError):
            # Some losses (in-place ops, .item()) cannot be vmapped; fall back to a loop.
            return torch.stack([self.loss(t) for t in thetas])

    def check_theta(self, theta: Tensor, what: str = "theta") -> Tensor:
        """Validate a parameter vector (or a batch of them) against this problem."""
        if not isinstance(theta, Tensor):
            raise InputError(f"{what} must be a torch.Tensor, got {type(theta).__name__}.")
        if theta.shape[-1:] != (self.dim,) or theta.dim() > 2:
            raise InputError(
                f"{what} has shape {tuple(theta.shape)} but problem {self.name!r} has "
                f"{self.dim} parameters; pass a ({self.dim},) vector or a (B, {self.dim}) batch."
            )
        if theta.dtype != self.dtype:
            raise InputError(
                f"{what} has dtype {theta.dtype} but problem {self.name!r} uses {self.dtype}; "
                f"convert it with .to({self.dtype})."
            )
        return theta

    def __repr__(self) -> str:
        return f"Problem({self.name!r}, dim={self.dim}, dtype={self.dtype}, device={self.device})"


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    return torch.as_tensor(x, dtype=dtype, device=device)


def quadratic(
    A: Tensor | Sequence[Sequence[float]],
    theta0: Tensor | Sequence[float] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Problem:
    """``L(theta) = 1/2 theta^T A theta`` with symmetric ``A``.

    GD, the principal flow and the modified-equation series agree exactly on it.

    Parameters
    ----------
    A : Tensor or nested sequence of float
        The symmetric ``(d, d)`` matrix.
    theta0 : Tensor or sequence of float, optional
        The initial point; None: the all-ones vector.
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
        When ``A`` is not a finite symmetric square matrix.

    Examples
    --------
    >>> import neuralflow as nf
    >>> nf.problems.quadratic([[1.0, 0.0], [0.0, 10.0]]).dim
    2
    """
    A = _as_tensor(A, dtype, device)
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise InputError(f"quadratic: A must be a square matrix, got shape {tuple(A.shape)}.")
    if not torch.isfinite(A).all():
        raise InputError("quadratic: A contains NaN or inf values.")
    if not torch.allclose(A, A.T, rtol=1e-10, atol=1e-12):
        raise InputError("quadratic: A must be symmetric; pass (A + A.T) / 2.")
    x0 = torch.ones(A.shape[0], dtype=dtype, device=A.device) if theta0 is None else _as_tensor(theta0, dtype, A.device)
    return Problem(
        "quadratic",
        x0,
        [lambda th: 0.5 * th @ (A @ th)],
        {"A": A.tolist(), "theta0": x0.tolist(), **_dtype_entry(dtype)},
    )


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


def _dtype_entry(dtype: torch.dtype) -> dict[str, str]:
    """A toy problem's description names its dtype when it is not the default float64 (older files lack it)."""
    return {} if dtype == torch.float64 else {"dtype": str(dtype).removeprefix("torch.")}


_ACTIVATIONS: dict[str, tuple[type[torch.nn.Module], bool]] = {
    # name -> (module, has smooth third derivatives)
    "tanh": (torch.nn.Tanh, True),
    "gelu": (torch.nn.GELU, True),
    "softplus": (torch.nn.Softplus, True),
    "sigmoid": (torch.nn.Sigmoid, True),
    "relu": (torch.nn.ReLU, False),
}


def _digits(n: int, dtype: torch.dtype, device: torch.device | str | None, who: str = "mlp_digits",
            images: bool = False) -> tuple[Tensor, Tensor]:
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


def _batch_shape(t: Tensor) -> str:
    return "(" + ", ".join(["N", *map(str, t.shape[1:])]) + ")"


def _same_shape(out: Tensor, target: Tensor, also: str = "") -> None:
    """Never broadcast: a target of another shape than the output is a mistake in the data."""
    if out.shape != target.shape:
        raise InputError(
            f"from_module: targets have shape {_batch_shape(target)} but the module's outputs have shape "
            f"{_batch_shape(out)}; pass targets of the outputs' shape{also}."
        )


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
        torch.nn.Conv2d(1, channels[0], 3, padding=1, dtype=f64), act(),
        torch.nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1, dtype=f64), act(),
        torch.nn.Flatten(), torch.nn.Linear(16 * channels[1], 10, dtype=f64),
    ).to(dtype=dtype, device=device)
    problem = from_module(net, x, y, loss="mse", batch_size=batch_size)
    problem.name = "cnn-digits"
    problem.description = {
        "name": "cnn-digits", "n": n, "channels": list(channels), "activation": activation, "seed": seed,
        "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size,
    }
    problem.thrice_differentiable = problem.twice_differentiable = smooth
    return problem


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
            raise InputError(f"lstm_recall: {name} must be at most {most} (the limits a saved run is checked "
                             f"against), got {value}.")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 1, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    torch.manual_seed(seed)
    net = _LastStepLSTM(hidden).to(dtype=dtype, device=device)  # built in float64 on the CPU, as mlp_digits
    problem = from_module(net, x, x[:, 0].clone(), loss="mse")
    problem.name = "lstm-recall"
    problem.description = {
        "name": "lstm-recall", "n": n, "length": length, "hidden": hidden, "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return problem


def _mse(out: Tensor, target: Tensor) -> Tensor:
    _same_shape(out, target)
    return 0.5 * ((out - target) ** 2).reshape(out.shape[0], -1).sum(dim=1).sum()


def _ce(out: Tensor, target: Tensor) -> Tensor:
    if target.dim() == out.dim() or target.is_floating_point():  # one-hot or soft targets
        _same_shape(out, target, " (or one class index per example)")
        return -(target * torch.log_softmax(out, dim=-1)).sum()
    return torch.nn.functional.cross_entropy(out, target, reduction="sum")


_LOSSES = {"mse": _mse, "ce": _ce}


def from_module(
    module: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: str = "mse",
    batch_size: int | None = None,
) -> Problem:
    """Full-batch loss of any ``torch.nn.Module`` over a flat parameter vector.

    ``loss="mse"`` is ``0.5 ||f(x) - y||^2`` averaged over examples; ``loss="ce"`` is the mean
    cross-entropy (class indices or one-hot / soft targets). The flat vector concatenates
    ``named_parameters()`` in order; buffers stay as they are. Evaluation goes through
    ``torch.func.functional_call``.

    Parameters
    ----------
    module : torch.nn.Module
        The model ``f``; its parameters' dtype and device are the problem's.
    inputs : Tensor
        The examples' inputs, ``(N, ...)``.
    targets : Tensor
        The examples' targets, ``(N, ...)`` of the outputs' shape (``"ce"`` also takes ``(N,)`` class indices).
    loss : str, default "mse"
        ``"mse"`` or ``"ce"``.
    batch_size : int, optional
        Split the data into chunks of at most this many examples, each chunk one part of the loss (the loss is
        unchanged); None: one part.

    Returns
    -------
    Problem
        The loss over one flat parameter vector, with its initial point ``theta0``.

    Raises
    ------
    InputError
        On an unknown loss, inputs and targets of different lengths or shapes, or non-finite data.

    Examples
    --------
    >>> import torch, neuralflow as nf
    >>> net = torch.nn.Linear(3, 1, dtype=torch.float64)
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    >>> nf.problems.from_module(net, x, y).dim
    4
    """
    if loss not in _LOSSES:
        raise InputError(f"from_module: unknown loss {loss!r}; choose from {sorted(_LOSSES)}.")
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise InputError("from_module: inputs and targets must be tensors.")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise InputError(
            f"from_module: inputs ({inputs.shape[0]} examples) and targets ({targets.shape[0]}) "
            "must have the same non-zero number of examples."
        )
    for what, t in (("inputs", inputs), ("targets", targets)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"from_module: the {what} contain NaN or inf; clean the data first.")
    names, params = zip(*module.named_parameters(), strict=True)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    if inputs.is_floating_point():
        inputs = inputs.to(dtype=theta0.dtype, device=theta0.device)
    targets = targets.to(
        dtype=theta0.dtype if targets.is_floating_point() else targets.dtype, device=theta0.device
    )
    buffers = dict(module.named_buffers())
    n = inputs.shape[0]
    criterion = _LOSSES[loss]

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        return {k: v.reshape(s) for k, v, s in zip(names, torch.split(theta, sizes), shapes, strict=True)}

    def make_part(x: Tensor, y: Tensor) -> LossFn:
        def part(theta: Tensor) -> Tensor:
            out = torch.func.functional_call(module, {**unflatten(theta), **buffers}, (x,))
            return criterion(out, y) / n

        return part

    step = n if batch_size is None else int(batch_size)
    if step < 1:
        raise InputError(f"from_module: batch_size must be positive, got {batch_size!r}.")
    parts = [make_part(inputs[i : i + step], targets[i : i + step]) for i in range(0, n, step)]
    return Problem(
        type(module).__name__.lower(),
        theta0,
        parts,
        {"module": repr(module), "examples": n, "loss": loss, "batch_size": batch_size},
    )


def from_function(fn: LossFn, theta0: Tensor, name: str = "function") -> Problem:
    """A problem from any loss callable ``fn(theta) -> 0-dim tensor`` and an initial point.

    Parameters
    ----------
    fn : callable
        ``fn(theta) -> 0-dim tensor``, differentiable by autograd (twice for the flows that need the Hessian,
        three times for those that need third derivatives).
    theta0 : Tensor
        The initial point, a non-empty 1-D tensor; its dtype and device are the problem's.
    name : str, default "function"
        The problem's name in tables and files.

    Returns
    -------
    Problem
        The loss over one flat parameter vector, with its initial point ``theta0``.

    Raises
    ------
    InputError
        When ``fn`` is not callable or ``theta0`` is not a non-empty 1-D tensor.

    Examples
    --------
    >>> import torch, neuralflow as nf
    >>> problem = nf.problems.from_function(lambda th: (th**4).sum(), torch.ones(3, dtype=torch.float64))
    >>> problem.dim
    3
    """
    if not callable(fn):
        raise InputError(f"from_function: fn must be callable, got {type(fn).__name__}.")
    return Problem(name, theta0, [fn], {"function": getattr(fn, "__qualname__", repr(fn))})


def from_file(
    path: str | os.PathLike,
    function: str = "build",
    loss: str = "mse",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> Problem:
    """A problem from a Python file defining ``function() -> (module, (inputs, targets))``, through :func:`from_module`.

    What the command line's ``--problem module:path/to/file.py:build`` calls. The file is run as a
    module (it may import anything); ``function`` takes no arguments and returns the module and its
    data, either as ``(module, (inputs, targets))`` or ``(module, inputs, targets)``. The module is
    cast to ``dtype`` (default: as built) and moved to ``device``; the data follow it. Then every check
    of :func:`from_module` applies. The description records the file's absolute path and the
    function, so :func:`make` rebuilds the problem from a trajectory (the file must still be there).
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise InputError(f"from_file: {path} is not a Python file; pass module:path/to/file.py:function.")
    spec = importlib.util.spec_from_file_location(f"neuralflow_user_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise InputError(f"from_file: Python cannot load {file} as a module.")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build = getattr(mod, function, None)
    if not callable(build):
        raise InputError(f"from_file: {file} defines no function {function!r}; define {function}() returning "
                         "(module, (inputs, targets)).")
    built = build()
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], (tuple, list)) and len(built[1]) == 2:
        built = (built[0], *built[1])
    if not (isinstance(built, tuple) and len(built) == 3 and isinstance(built[0], torch.nn.Module)):
        raise InputError(f"from_file: {file}:{function}() must return (module, (inputs, targets)) with a "
                         f"torch.nn.Module, got {type(built).__name__}.")
    module, inputs, targets = built
    module = module.to(device=device, dtype=dtype)
    problem = from_module(module, inputs, targets, loss=loss, batch_size=batch_size)
    problem.name = "module"
    problem.description = {
        "name": "module", "path": str(file), "function": function, "loss": loss, "batch_size": batch_size,
        "dtype": str(problem.dtype).removeprefix("torch."),
    }
    return problem


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "quadratic": quadratic,
    "zhu-quartic": zhu_quartic,
    "scalar-factorization": scalar_factorization,
    "mlp-digits": mlp_digits,
    "cnn-digits": cnn_digits,
    "lstm-recall": lstm_recall,
    "module": from_file,
}


def make(
    description: dict[str, Any],
    max_params: int | None = MAX_PARAMS,
    device: torch.device | str | None = None,
    allow_code: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Problem:
    """Rebuild a registered problem from its JSON description (as saved in trajectories).

    The description is checked against its schema (``neuralflow._validate.PROBLEM_DESCRIPTIONS``) first,
    and a problem of more than ``max_params`` parameters is refused before it is built (None: no
    limit); a description comes from a file, and a file must not decide how much memory is allocated.
    Nor which code runs: a problem from the user's own Python file (:func:`from_file`) is rebuilt by
    running that file, so only with ``allow_code=True``. ``device`` and ``dtype``: where and in which
    precision to build it (``dtype`` overrides the description's).
    """
    check_problem_description(description, check_max_params(max_params))
    kwargs = dict(description)
    name = kwargs.pop("name", None)
    if name == "module" and not allow_code:
        raise InputError(
            f"this problem is your own Python file ({kwargs.get('path')}:{kwargs.get('function')}); rebuilding it "
            "runs that file. Pass allow_code=True (command line: --allow-code) if you trust it."
        )
    if name not in PROBLEMS:
        raise InputError(
            f"cannot rebuild problem {name!r} from its description; registered problems are "
            f"{sorted(PROBLEMS)}. Build it yourself and pass it explicitly."
        )
    if dtype is not None:
        kwargs["dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in kwargs:
        if kwargs["dtype"] not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {kwargs['dtype']!r}.")
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    for key in ("widths", "channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if "theta0" in kwargs:
        kwargs["theta0"] = tuple(kwargs["theta0"])
    if device is not None:
        kwargs["device"] = device
    return PROBLEMS[name](**kwargs)


def check_lr(lr: float) -> float:
    """Validate a step size: a positive finite number."""
    return check_positive_finite(lr, "lr")


def check_positive_int(value: int, name: str) -> int:
    """Validate a count (steps, window, ...): a positive int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    return value


def check_nonnegative_int(value: int, name: str, zero: str = "") -> int:
    """Validate a count that may be 0 (``zero`` says what 0 means, e.g. "never"): a non-negative int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{name} must be a non-negative int{f' (0 = {zero})' if zero else ''}, got {value!r}.")
    return value
