"""Problems: a full-batch loss over one flat parameter vector, and its initial point.

Stage 1 of the pipeline (see the README). A :class:`Problem` is what GD runs on and what every flow
differentiates. Its loss is a sum of *parts* (data chunks of at most ``batch_size`` examples,
weighted so that they add up to the full-batch mean), so a large data set never needs one huge
forward pass; the derivatives in :mod:`neuralflow.autodiff` accumulate over the parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

LossFn = Callable[[Tensor], Tensor]

__all__ = [
    "Problem",
    "quadratic",
    "zhu_quartic",
    "scalar_factorization",
    "mlp_digits",
    "from_module",
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
    ``theta0`` defaults to the all-ones vector.
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
        {"A": A.tolist(), "theta0": x0.tolist()},
    )


def zhu_quartic(
    theta0: Sequence[float] = (3.2, 0.3),
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Problem:
    """``L(x, y) = 1/4 (x^2 y^2 - 1)^2`` (Zhu et al., ICLR 2023).

    On the minimum set ``xy = 1`` the sharpness is ``2 (x^2 + y^2) >= 4``; with ``lr = 0.2`` from
    the default initialisation GD enters the edge of stability.
    """
    x0 = _as_tensor(theta0, dtype, device)
    if x0.shape != (2,):
        raise InputError(f"zhu_quartic: theta0 must have 2 entries, got shape {tuple(x0.shape)}.")
    return Problem(
        "zhu-quartic",
        x0,
        [lambda th: 0.25 * (th[0] ** 2 * th[1] ** 2 - 1) ** 2],
        {"theta0": x0.tolist()},
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
        {"depth": depth, "theta0": x0.tolist()},
    )


_ACTIVATIONS: dict[str, tuple[type[torch.nn.Module], bool]] = {
    # name -> (module, has smooth third derivatives)
    "tanh": (torch.nn.Tanh, True),
    "gelu": (torch.nn.GELU, True),
    "softplus": (torch.nn.Softplus, True),
    "sigmoid": (torch.nn.Sigmoid, True),
    "relu": (torch.nn.ReLU, False),
}


def _digits(n: int, dtype: torch.dtype, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    if not isinstance(n, int) or not 1 <= n <= len(data.target):
        raise InputError(f"mlp_digits: n must be an int in [1, {len(data.target)}], got {n!r}.")
    x = torch.as_tensor(data.data[:n] / 16.0, dtype=dtype, device=device)
    y = torch.nn.functional.one_hot(torch.as_tensor(data.target[:n]), 10).to(dtype=dtype, device=device)
    return x, y


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
    """
    if activation not in _ACTIVATIONS:
        raise InputError(f"mlp_digits: unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}.")
    widths = tuple(int(w) for w in widths)
    if any(w < 1 for w in widths):
        raise InputError(f"mlp_digits: widths must be positive, got {widths}.")
    x, y = _digits(n, dtype, device)
    act, smooth = _ACTIVATIONS[activation]
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    sizes = (64, *widths)
    for a, b in zip(sizes[:-1], sizes[1:]):
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


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return 0.5 * ((out - target) ** 2).reshape(out.shape[0], -1).sum(dim=1).sum()


def _ce(out: Tensor, target: Tensor) -> Tensor:
    if target.dim() == out.dim():  # one-hot or soft targets
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
    ``torch.func.functional_call``. With ``batch_size`` the data are split into chunks of at most
    that many examples, each chunk one part of the loss.
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
    names, params = zip(*module.named_parameters())
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
        return {k: v.reshape(s) for k, v, s in zip(names, torch.split(theta, sizes), shapes)}

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
    """A problem from any loss callable ``fn(theta) -> 0-dim tensor`` and an initial point."""
    if not callable(fn):
        raise InputError(f"from_function: fn must be callable, got {type(fn).__name__}.")
    return Problem(name, theta0, [fn], {"function": getattr(fn, "__qualname__", repr(fn))})


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "quadratic": quadratic,
    "zhu-quartic": zhu_quartic,
    "scalar-factorization": scalar_factorization,
    "mlp-digits": mlp_digits,
}


def make(description: dict[str, Any]) -> Problem:
    """Rebuild a registered problem from its JSON description (as saved in trajectories)."""
    kwargs = dict(description)
    name = kwargs.pop("name", None)
    if name not in PROBLEMS:
        raise InputError(
            f"cannot rebuild problem {name!r} from its description; registered problems are "
            f"{sorted(PROBLEMS)}. Build it yourself and pass it explicitly."
        )
    if "dtype" in kwargs:
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    if "theta0" in kwargs:
        kwargs["theta0"] = tuple(kwargs["theta0"])
    return PROBLEMS[name](**kwargs)


def check_lr(lr: float) -> float:
    """Validate a step size: a positive finite number."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a positive finite number, got {lr!r}.")
    return float(lr)


def check_positive_int(value: int, name: str) -> int:
    """Validate a count (steps, window, ...): a positive int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")
    return value
