"""Safe, versioned, atomic files: named tensors plus JSON metadata, never a pickle.

The container is safetensors: an 8-byte header length, a JSON header, raw tensor bytes. Our
metadata sits in the header under ``"neuralflow"``: the file kind, the format version, the
library versions, the caller's metadata, a SHA-256 of the tensor bytes, so truncation and
tampering are detected, and the ``"provenance"`` of the file (:func:`neuralflow.provenance.provenance`:
command, commit, versions, device, dtype, threads; files written before it lack the key and load).
Loading parses JSON and raw numbers only; it never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FileFormatError

FORMAT_VERSION = 1
_MAX_HEADER = 100_000_000


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _version() -> str:
    from . import __version__

    return __version__


def write(path: str | os.PathLike, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically (temporary file, rename)."""
    from safetensors.torch import save

    from .provenance import provenance

    path = Path(path)
    floating = next((v for v in tensors.values() if v.is_floating_point()), None)
    prov = provenance(*(None, None) if floating is None else (floating.device, floating.dtype))
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "neuralflow_version": _version(),
        "torch_version": torch.__version__,
        "sha256": _digest(cpu),
        "meta": meta,
        "provenance": prov,
    }
    blob = save(cpu, metadata={"neuralflow": json.dumps(header)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`write`; raise :class:`FileFormatError` naming the file."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file.")
    data = path.read_bytes()

    def bad(why: str) -> FileFormatError:
        return FileFormatError(f"{path}: {why}")

    if len(data) < 8:
        raise bad("file is truncated or is not a neuralflow file.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise bad("not a neuralflow file (no valid header), or it is truncated.")
    try:
        raw = json.loads(data[8 : 8 + n])
        header = json.loads(raw["__metadata__"]["neuralflow"])
    except (ValueError, KeyError, TypeError):
        raise bad("not a neuralflow file (no neuralflow metadata in the header).") from None
    if header.get("kind") != kind:
        raise bad(f"holds a {header.get('kind')!r}, expected a {kind!r}.")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise bad(
            f"format version {version!r} is newer than this neuralflow supports ({FORMAT_VERSION}); "
            "upgrade neuralflow to read it."
        )
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise bad(f"tensor data are truncated or corrupt ({exc}).") from None
    if _digest(tensors) != header.get("sha256"):
        raise bad("tensor data do not match the checksum in the header (the file was modified).")
    return tensors, header
