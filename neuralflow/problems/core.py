"""The problem and the builders every other one goes through: :class:`Problem`, :func:`quadratic`,
:func:`from_module`, :func:`from_function`, and the checks of step sizes and counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._validate import check_positive_finite
from ..errors import InputError

LossFn = Callable[[Tensor], Tensor]


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


def _dtype_entry(dtype: torch.dtype) -> dict[str, str]:
    """A toy problem's description names its dtype when it is not the default float64 (older files lack it)."""
    return {} if dtype == torch.float64 else {"dtype": str(dtype).removeprefix("torch.")}


def _batch_shape(t: Tensor) -> str:
    return "(" + ", ".join(["N", *map(str, t.shape[1:])]) + ")"


def _same_shape(out: Tensor, target: Tensor, also: str = "") -> None:
    """Never broadcast: a target of another shape than the output is a mistake in the data."""
    if out.shape != target.shape:
        raise InputError(
            f"from_module: targets have shape {_batch_shape(target)} but the module's outputs have shape "
            f"{_batch_shape(out)}; pass targets of the outputs' shape{also}."
        )


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
    targets = targets.to(dtype=theta0.dtype if targets.is_floating_point() else targets.dtype, device=theta0.device)
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
