"""Notebook display shared by every stage: HTML tables and pandas data frames (pandas is optional)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from .errors import NeuralflowError


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> str:
    """An HTML table of ``rows`` (cells converted with ``str`` and escaped) under ``header``."""
    e = html.escape
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def data_frame(data: Any, **kwargs: Any) -> Any:
    """``pandas.DataFrame(data, **kwargs)``; a clear error when pandas is not installed."""
    try:
        import pandas as pd
    except ModuleNotFoundError:
        raise NeuralflowError(
            "to_frame() needs pandas, an optional dependency: pip install 'neuralflow[frames]' (or pandas)."
        ) from None
    return pd.DataFrame(data, **kwargs)


def columns(series: dict[str, Any]) -> dict[str, Any]:
    """Tensors as NumPy columns; an ``(N, k)`` tensor becomes ``name_1 .. name_k`` (one ``name`` when ``k`` is 1)."""
    out: dict[str, Any] = {}
    for name, value in series.items():
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
        if getattr(value, "ndim", 1) == 2:
            if value.shape[1] == 1:
                out[name] = value[:, 0]
            else:
                out.update({f"{name}_{i + 1}": value[:, i] for i in range(value.shape[1])})
        else:
            out[name] = value
    return out
