"""On-disk conventions of an activation store, shared by the writer and the readers.

Everything that decides a byte of the store lives here (file names, JSON encoding, how a
file is committed), so that a resumed store is byte-identical to one written in one go.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from visae.errors import VisaeError

SCHEMA_VERSION = 1
FORMAT_NAME = "visae.activation-store"
MANIFEST = "manifest.json"
METADATA_DIR = "metadata"
DTYPES = ("float16", "float32")
TOKEN_CHOICES = ("all", "patch", "cls")
TMP_SUFFIX = ".tmp"

_HASH_CHUNK = 1 << 20


def layer_dir(layer: int) -> str:
    return f"layer_{layer:02d}"


def shard_file(layer: int, shard: int) -> str:
    """Path of a layer's shard relative to the store root."""
    return f"{layer_dir(layer)}/shard_{shard:05d}.npy"


def metadata_file(shard: int) -> str:
    """Path of a shard's per-image metadata (JSON lines) relative to the store root."""
    return f"{METADATA_DIR}/shard_{shard:05d}.jsonl"


def tmp_path(final: Path) -> Path:
    """The temporary name a file is written under before its rename: hidden, same folder
    (a rename within one folder is atomic), recognisable so a resume can remove it."""
    return final.with_name(f".{final.name}{TMP_SUFFIX}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indent, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def dumps_json_line(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def normalise_json(obj: Any) -> Any:
    """The value as it reads back from the manifest (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, allow_nan=False))


def _layout_ints(layout: dict[str, Any]) -> tuple[int, int, int, int]:
    return (
        int(layout["n_cls"]),
        int(layout["n_registers"]),
        int(layout["grid"][0]),
        int(layout["grid"][1]),
    )


def n_layout_tokens(layout: dict[str, Any]) -> int:
    n_cls, n_reg, h, w = _layout_ints(layout)
    return n_cls + n_reg + h * w


def stored_selection(layout: dict[str, Any], tokens: str) -> tuple[int, int, dict[str, Any]]:
    """Which model tokens a store keeps: `(start, stop, stored_layout)`.

    Every choice is a contiguous range because tokens are ordered CLS, registers, patches.
    """
    n_cls, n_reg, h, w = _layout_ints(layout)
    total = n_cls + n_reg + h * w
    if tokens == "all":
        return 0, total, {"n_cls": n_cls, "n_registers": n_reg, "grid": [h, w]}
    if tokens == "patch":
        if h * w == 0:
            raise VisaeError("tokens='patch' asked of a layer without patch tokens")
        return n_cls + n_reg, total, {"n_cls": 0, "n_registers": 0, "grid": [h, w]}
    if tokens == "cls":
        if n_cls == 0:
            raise VisaeError("tokens='cls' asked of a layer without a CLS token")
        return 0, n_cls, {"n_cls": n_cls, "n_registers": 0, "grid": [0, 0]}
    raise VisaeError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, not {tokens!r}")


def kinds_runs(layout: dict[str, Any]) -> list[list[Any]]:
    """Token kinds of a layout as `[kind, count]` runs, in token order (compact labels)."""
    n_cls, n_reg, h, w = _layout_ints(layout)
    runs = [["cls", n_cls], ["register", n_reg], ["patch", h * w]]
    return [r for r in runs if r[1] > 0]


class HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes going through it, so a
    shard's checksum costs no second read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.n_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.n_bytes += len(data)
        return self._f.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a kill never needs it; a power cut does)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, write: Callable[[HashingWriter], None]) -> dict[str, Any]:
    """Write a file under its temporary name, fsync it, then rename it into place.

    Returns `{"bytes", "sha256"}` of what was written. A full disk becomes a one-line
    VisaeError and leaves no temporary file behind.
    """
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            hw = HashingWriter(f)
            write(hw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VisaeError(f"disk full while writing {final}") from None
        raise VisaeError(f"cannot write {final}: {e.strerror or e}") from None
    return {"bytes": hw.n_bytes, "sha256": hw.sha256.hexdigest()}


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file (constant memory, whatever the shard size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
