"""Safe, versioned, atomic files: named tensors plus JSON metadata, never a pickle.

The container is safetensors: an 8-byte header length, a JSON header, raw tensor bytes. Our
metadata sits in the header under ``"neuralflow"``: the file kind, the format version, the
library versions, the caller's metadata and a SHA-256 of the whole of it (format version 2: the
canonical JSON of every header field but the checksum itself, then the tensors' names, dtypes, shapes
and bytes), so truncation, bit flips and edits of the numbers *or the metadata* are detected. Version 1
files (checksum of the tensors only) still load. Before anything is built from it, the metadata is
checked against its kind's schema (:data:`neuralflow._validate.SCHEMAS`). The header also records the
``"provenance"`` of the file (:func:`neuralflow.provenance.provenance`: command, commit, versions, device,
dtype, threads; files written before it lack the key and load). Loading parses JSON and raw numbers only;
it never executes code.

Writes are atomic: a temporary file ``.<name>.nf<pid>-<random>.tmp`` next to the target, then a
rename. A write first removes the temporary files of *its own target* left by a killed neuralflow
(their process no longer runs, or they are a day old); nothing else is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor

from ._validate import HEADER, SCHEMAS
from .errors import FileFormatError, InputError
from .provenance import __version__, provenance

FORMAT_VERSION = 2
_MAX_HEADER = 100_000_000
_STALE_AGE = 86_400.0  # seconds after which a temporary file is stale whatever its process


def _tensor_digest(tensors: dict[str, Tensor]) -> hashlib._Hash:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h


def digest(header: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the header (every field but ``sha256``, canonical JSON) and of the tensors (version 2)."""
    h = _tensor_digest(tensors)
    fields = {k: v for k, v in header.items() if k != "sha256"}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())
    return h.hexdigest()


def _temporary_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(f".{name}.nf") + r"(\d+)-[A-Za-z0-9_]+\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writes of ``path`` left next to it; return them.

    Only files named like this module's own temporaries for that very target are considered, and
    only those whose writing process is gone (or that are a day old).
    """
    path = Path(path)
    pattern = _temporary_pattern(path.name)
    removed: list[Path] = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for tmp in candidates:
        match = pattern.fullmatch(tmp.name)
        if match is None:
            continue
        try:
            stale = not _alive(int(match.group(1))) or now - tmp.stat().st_mtime > _STALE_AGE
            if stale and match.group(1) != str(os.getpid()):
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """Make sure ``path`` (a file, or with ``folder=True`` a folder) can be written, before any work is done.

    Creates the missing parent folders (a write would), then creates and removes a temporary file
    there. Raises :class:`InputError` saying what is wrong.
    """
    path = Path(path)
    directory = path if folder else path.parent
    if not folder and path.is_dir():
        raise InputError(f"cannot write {path}: it is a folder; give a file name.")
    if directory.exists() and not directory.is_dir():
        raise InputError(f"cannot write into {directory}: it is a file, not a folder; choose another path.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.nf{os.getpid()}-", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"cannot write {path} ({exc.strerror or exc}); choose another path.") from None
    return path


def write(path: str | os.PathLike, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically (temporary file, rename)."""
    floating = next((v for v in tensors.values() if v.is_floating_point()), None)
    prov = provenance(*(None, None) if floating is None else (floating.device, floating.dtype))
    cpu, storages = {}, set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        cpu[name] = t
    header = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "neuralflow_version": __version__,
        "torch_version": torch.__version__,
        "meta": meta,
        "provenance": prov,
    }
    header = json.loads(json.dumps(header))  # what a reader will parse (tuples become lists, keys strings)
    header["sha256"] = digest(header, cpu)
    return write_atomic(path, save(cpu, metadata={"neuralflow": json.dumps(header)}))


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A reader sees the old file or the new one, never a partial write (an interrupted run leaves
    at most a hidden ``.tmp`` file behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.nf{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`write`; raise :class:`FileFormatError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file.")
    return parse(path.read_bytes(), kind, str(path))


def parse(data: bytes, kind: str, where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the checked header of the bytes of a file written by :func:`write`.

    Order of the checks: container, header schema, kind, version, checksum, then the metadata
    against ``SCHEMAS[kind]``: nothing is interpreted that the checksum has not covered.
    """

    def bad(why: str) -> FileFormatError:
        return FileFormatError(f"{where}: {why}")

    if len(data) < 8:
        raise bad("file is truncated or is not a neuralflow file.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise bad("not a neuralflow file (no valid header), or it is truncated.")
    try:
        raw = json.loads(data[8 : 8 + n])
        header = json.loads(raw["__metadata__"]["neuralflow"])
    except RecursionError:
        raise bad("the header is nested too deeply to be a neuralflow header; the file is damaged.") from None
    except (ValueError, KeyError, TypeError):
        raise bad("not a neuralflow file (no neuralflow metadata in the header).") from None
    if not isinstance(header, dict):
        raise bad("not a neuralflow file (its metadata is not a mapping).")
    if header.get("kind") != kind:
        raise bad(f"holds a {header.get('kind')!r}, expected a {kind!r}.")
    version = header.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise bad(
            f"format version {version!r} is newer than this neuralflow supports ({FORMAT_VERSION}); "
            "upgrade neuralflow to read it."
        )
    try:
        HEADER.check(header, "header")
    except InputError as exc:
        raise bad(f"damaged header: {exc}") from None
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise bad(f"tensor data are truncated or corrupt ({exc}).") from None
    expected = _tensor_digest(tensors).hexdigest() if version == 1 else digest(header, tensors)
    if expected != header["sha256"]:
        raise bad("the data do not match the checksum in the header (the file was modified or damaged).")
    try:
        SCHEMAS[kind].check(header["meta"], "metadata")
    except InputError as exc:
        raise bad(f"invalid {exc}") from None
    return tensors, header
