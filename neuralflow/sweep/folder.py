"""A sweep's results folder: its manifest, each run's files and row (written atomically, the row last), and
the table.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .. import _io
from ..errors import FileFormatError
from .task import _versions

SWEEP_FORMAT = 1


_ROW_KIND = "sweep-row"


def _open_folder(out: Path) -> None:
    """Create ``out`` or check that this neuralflow wrote it; never changes a foreign folder."""
    manifest = out / "sweep.json"
    mine = {"format": SWEEP_FORMAT, "neuralflow_version": _versions()["neuralflow_version"]}
    if manifest.exists():
        try:
            theirs = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise FileFormatError(f"{manifest}: not a neuralflow sweep manifest ({err}); use another folder.") from None
        if not isinstance(theirs, dict) or {k: theirs.get(k) for k in mine} != mine:
            raise FileFormatError(
                f"{out} holds a sweep written by neuralflow {theirs.get('neuralflow_version')!r} (sweep format "
                f"{theirs.get('format')!r}); this is neuralflow {mine['neuralflow_version']} (format {SWEEP_FORMAT}), "
                "whose rows would not be comparable. Pass another output folder; nothing in this one was changed."
            )
    elif out.exists() and any(out.iterdir()):
        raise FileFormatError(f"{out} exists and is not a neuralflow sweep folder; pass a new or empty folder.")
    else:
        _io.write_atomic(manifest, json.dumps(mine, indent=1).encode())


def _row_path(out: Path, key: str) -> Path:
    return out / "runs" / key / "row.nfr"


def _read_row(out: Path, key: str) -> dict[str, Any] | None:
    path = _row_path(out, key)
    if not path.exists():
        return None
    _, header = _io.read(path, _ROW_KIND)
    version = _versions()["neuralflow_version"]
    if header.get("neuralflow_version") != version:
        raise FileFormatError(
            f"{path}: written by neuralflow {header.get('neuralflow_version')!r}, this is {version}; "
            "pass another output folder."
        )
    return header["meta"]["row"]


def _save_run(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    row = dict(result["row"])
    folder = out / "runs" / row["key"]
    for name, blob in result["files"].items():
        _io.write_atomic(folder / name, blob)
        row[f"file.{name.split('.')[0]}"] = str(Path("runs") / row["key"] / name)
    _io.write(_row_path(out, row["key"]), _ROW_KIND, {}, {"row": row})  # last: the run counts as done
    return row


def _save_table(out: Path, table: Any) -> None:
    _io.write_atomic(out / "table.csv", table.to_csv(index=False).encode())
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    _io.write_atomic(out / "table.parquet", buffer.getvalue())
