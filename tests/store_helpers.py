"""Synthetic stores shared by the activation-store tests (test_store*.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visae.store import LayerSpec, StoreSpec, StoreWriter

# layer 2: ViT-like (1 CLS, 2 registers, 2x3 patches); layer 5: CNN-like (2x2 grid, no CLS)
LAYOUT_VIT = {"n_cls": 1, "n_registers": 2, "grid": [2, 3]}
LAYOUT_CNN = {"n_cls": 0, "n_registers": 0, "grid": [2, 2]}
SIZES = [4, 4, 4, 3]


def make_spec(**changes: Any) -> StoreSpec:
    fields: dict[str, Any] = {
        "backbone": {"name": "toy", "weights_hash": "abc123", "preprocessing": {"size": 16}},
        "dataset": {"name": "toyset", "fingerprint": "fp-1"},
        "layers": [LayerSpec(2, 8, LAYOUT_VIT), LayerSpec(5, 6, LAYOUT_CNN)],
        "dtype": "float16",
        "tokens": "all",
        "shard_images": 4,
    }
    fields.update(changes)
    return StoreSpec(**fields)


def shard_data(
    spec: StoreSpec, shard: int, n: int, seed: int = 7
) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """Deterministic synthetic activations of one shard (seeded per shard, so a resumed
    writer produces the same arrays)."""
    rng = np.random.default_rng([seed, shard])
    acts = {
        e["layer"]: rng.standard_normal((n, e["n_tokens"], e["d"])).astype(np.float32)
        for e in spec.layer_entries
    }
    meta = [{"source": f"img{shard}_{i}", "labels": [f"c{i % 2}"]} for i in range(n)]
    return acts, meta


def write_store(
    path: Path, spec: StoreSpec, sizes: Sequence[int] = SIZES, finish: bool = True
) -> dict[int, np.ndarray]:
    """Write a store; returns the concatenated input arrays per layer."""
    parts: dict[int, list[np.ndarray]] = {e["layer"]: [] for e in spec.layer_entries}
    with StoreWriter(path, spec) as w:
        for s in range(w.n_shards, len(sizes)):
            acts, meta = shard_data(spec, s, sizes[s])
            w.append_shard(acts, meta)
            for layer, a in acts.items():
                parts[layer].append(a)
        if finish:
            w.finish()
    return {layer: np.concatenate(p) for layer, p in parts.items() if p}


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, hidden ones included."""
    return {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def tagged_store(
    path: Path, dtype: str, sizes: Sequence[int], classes: Sequence[int] | None = None
) -> StoreSpec:
    """Every token's vector is [image, token, image, token] (exact in float16 and float32), or
    with `classes` (one per image) [image, token, image, class]. 1 CLS, 2 registers, 6
    patches per image; shard k holds `sizes[k]` images."""
    spec = make_spec(dtype=dtype, layers=[LayerSpec(2, 4, LAYOUT_VIT)], shard_images=max(sizes))
    first = 0
    with StoreWriter(path, spec) as w:
        for n in sizes:
            img = np.arange(first, first + n, dtype=np.float32)[:, None].repeat(9, 1)
            tok = np.arange(9, dtype=np.float32)[None, :].repeat(n, 0)
            last = tok
            if classes is not None:
                last = np.asarray(classes[first : first + n], np.float32)[:, None].repeat(9, 1)
            acts = np.stack([img, tok, img, last], axis=-1)
            w.append_shard({2: acts}, [{"source": str(first + i)} for i in range(n)])
            first += n
        w.finish()
    return spec


def token_ids(batches: list[np.ndarray]) -> list[tuple[int, int]]:
    """(image, token) of every row of the batches of a `tagged_store` (float32 checked)."""
    allb = np.concatenate(batches)
    assert allb.dtype == np.float32
    assert np.array_equal(allb[:, 0], allb[:, 2])
    return [(int(a), int(b)) for a, b in allb[:, :2]]
