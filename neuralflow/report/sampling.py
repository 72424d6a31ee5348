"""Evaluating the report's functions on many states: evenly spread samples, and batches whose results are joined."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


def spread(n: int, k: int, device: torch.device) -> Tensor:
    """At most ``k`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long().unique()


def concat(parts: list[Any]) -> Any:
    """Concatenate per-batch results along the states: tensors, dicts of them, dataclasses of them, None."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: concat([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(**{f.name: concat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)})
    return torch.cat(parts)


def in_batches(fn: Any, states: Tensor, batch: int) -> Any:
    """Apply ``fn`` to ``states`` in batches of ``batch`` and concatenate the results (:func:`concat`)."""
    return concat([fn(states[i : i + batch]) for i in range(0, len(states), batch)])
