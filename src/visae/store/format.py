"""On-disk conventions of an activation store, shared by the writer and the readers.

Everything that decides a byte of the store lives here (file names, JSON encoding), so that a
resumed store is byte-identical to one written in one go; files are committed by
`visae.atomic.write_file`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from visae.errors import VisaeError

SCHEMA_VERSION = 1
FORMAT_NAME = "visae.activation-store"
MANIFEST = "manifest.json"
METADATA_DIR = "metadata"
# Shards written by the ranks of a distributed extraction wait here, one record each, until rank
# 0 lists them in the manifest (the folder is gone from a finished store).
PARTS_DIR = "parts"
DTYPES = ("float16", "float32")
TOKEN_CHOICES = ("all", "patch", "cls")
AUTOCAST_CHOICES = ("bf16", "fp16")

_HASH_CHUNK = 1 << 20


def layer_dir(layer: int) -> str:
    return f"layer_{layer:02d}"


def shard_file(layer: int, shard: int) -> str:
    """Path of a layer's shard relative to the store root."""
    return f"{layer_dir(layer)}/shard_{shard:05d}.npy"


def metadata_file(shard: int) -> str:
    """Path of a shard's per-image metadata (JSON lines) relative to the store root."""
    return f"{METADATA_DIR}/shard_{shard:05d}.jsonl"


def part_file(shard: int) -> str:
    """Path of a shard's record from a distributed extraction, relative to the store root."""
    return f"{PARTS_DIR}/shard_{shard:05d}.json"


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


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file (constant memory, whatever the shard size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
