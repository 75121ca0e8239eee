"""The JSON documents the browser reads, built from analysis artifacts. The server sends them
as `/data/<key>.json`; the static export writes the same documents as `data/<key>.js`.

What every page of an analysis shares lives in two documents the app loads once: `latents`
(the per-latent table and each latent's exemplar images) and `images` (thumbnail, labels and
source of every image). Latent and image pages name images by id only, and carry their bulk
(activation maps, per-patch codes) as base64-packed little-endian arrays, so a static export
stays a small multiple of the artifact rather than repeating image records on every page."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from visae.analysis.artifact import LATENT_COLUMNS, Analysis
from visae.errors import VisaeError

# exemplars listed per latent on an image page (its top images under the "max" ranking)
EXEMPLARS = 6
# maps are sent as integers 0..255 relative to the latent's max patch activation
MAP_LEVELS = 255
# a sparse map addresses patches with uint16, so grids above this size are always sent dense
SPARSE_MAX_PATCHES = 1 << 16
# the dtype of each sparse map entry: patch index, level (3 bytes, packed)
SPARSE_ENTRY = np.dtype([("patch", "<u2"), ("level", "u1")])

_KEY = re.compile(r"^(index|a(\d+)/latents|a(\d+)/images|a(\d+)/latent/(\d+)|a(\d+)/image/(\d+))$")


def _floats(values: np.ndarray, decimals: int = 6) -> list[float | None]:
    """JSON-safe floats: rounded (compact text), NaN/inf as null."""
    arr = np.asarray(values, dtype=np.float64)
    out = np.round(arr, decimals).tolist()
    return [v if math.isfinite(v) else None for v in out]


def _sig(values: np.ndarray) -> list[float | None]:
    """Floats rounded to 4 significant digits (display precision; float16 holds ~3.3)."""
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(arr != 0, np.floor(np.log10(np.abs(arr))), 0)
    scale = 10.0 ** (3 - mag)
    out = (np.round(arr * scale) / scale).tolist()
    return [v if math.isfinite(v) else None for v in out]


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def map_levels(values: np.ndarray, scale: float) -> np.ndarray:
    """A latent's map as uint8 levels 0..MAP_LEVELS of its max patch activation `scale`."""
    q = np.round(np.asarray(values, dtype=np.float64).ravel() / scale * MAP_LEVELS)
    return np.clip(q, 0, MAP_LEVELS).astype(np.uint8)


def encode_map(levels: np.ndarray) -> str:
    """Base64 of a map's uint8 levels: dense (one byte per patch, row-major) or, when shorter,
    sparse (`SPARSE_ENTRY` per nonzero patch). Maps are mostly zero: a latent fires on a few
    patches. The decoded length tells the two apart: dense is exactly one byte per patch,
    sparse is a multiple of 3 bytes below that."""
    levels = np.asarray(levels, dtype=np.uint8).ravel()
    nz = np.flatnonzero(levels)
    if levels.size <= SPARSE_MAX_PATCHES and 3 * nz.size < levels.size:
        entries = np.empty(nz.size, dtype=SPARSE_ENTRY)
        entries["patch"] = nz
        entries["level"] = levels[nz]
        return _b64(entries)
    return _b64(levels)


def code_id_dtype(n_latents: int) -> np.dtype:
    """Little-endian integer type of the latent ids of image pages: int16 below 32768 latents
    (as the artifact stores them), int32 above; -1 marks an empty slot."""
    return np.dtype("<i2") if n_latents < 2**15 else np.dtype("<i4")


def index_payload(analyses: Sequence[Analysis]) -> dict[str, Any]:
    """What the app shows on its front page, for every analysis."""
    items = []
    for idx, a in enumerate(analyses):
        meta = a.meta
        items.append(
            {
                "id": idx,
                "name": a.name,
                "backbone": meta.get("backbone"),
                "layer": meta.get("layer"),
                "sae": {
                    "arch": meta["sae"]["config"].get("arch"),
                    "n_latents": a.n_latents,
                    "k": meta["sae"]["config"].get("k"),
                    "path": meta["sae"].get("path"),
                },
                "grid": list(a.grid),
                "n_images": a.n_images,
                "n_dead": int(a.dead.sum()),
                "rankings": a.rankings,
                "top_n": a.top_n,
                "metrics": sorted(a.metrics),
                "texts": sorted(a.texts),
                "sources": a.sources,
                "has_labels": bool(meta.get("has_labels")),
                "fingerprint": a.dataset_fingerprint,
                "patch_codes_k": int(meta["patch_codes_k"]),
                "sample": [{"image": i, "thumb": a.images[i]["thumb"]} for i in a.sample_images],
                "code_images": a.code_images.tolist(),
                "frequency_plot": "plots/frequency.png",
            }
        )
    return {"analyses": items}


def latents_payload(a: Analysis) -> dict[str, Any]:
    """The latent table as columns (the list page sorts and filters it client-side; latent and
    image pages read their statistics from it), the extra numeric `metrics` and `texts`
    columns (null: no value), and each latent's exemplars: its first `EXEMPLARS` top images
    under the "max" ranking."""
    table = a.table
    cols: dict[str, Any] = {}
    for name, kind in LATENT_COLUMNS:
        if kind == "int":
            cols[name] = table[name].tolist()
        elif kind == "str":
            cols[name] = [str(v) for v in table[name]]
        else:
            cols[name] = _floats(table[name], 8)
    metrics = {name: _floats(v, 8) for name, v in sorted(a.metrics.items())}
    texts = dict(sorted(a.texts.items()))
    _, max_images = a.top_arrays("max")
    top = np.asarray(max_images[:, :EXEMPLARS])
    exemplars = [[int(i) for i in row if i >= 0] for row in top]
    return {"columns": cols, "metrics": metrics, "texts": texts, "exemplars": exemplars}


def images_payload(a: Analysis) -> dict[str, Any]:
    """Every image of the artifact as columns: id, thumbnail, source, labels (indices into
    `label_names`, which holds each distinct label once) and whether its codes are stored."""
    ids = sorted(a.images)
    names: dict[str, int] = {}
    labels = []
    for i in ids:
        row = a.images[i].get("labels", [])
        labels.append([names.setdefault(str(lab), len(names)) for lab in row])
    code_set = set(a.code_images.tolist())
    return {
        "image": ids,
        "thumb": [a.images[i]["thumb"] for i in ids],
        "source": [str(a.images[i].get("source", "")) for i in ids],
        "labels": labels,
        "label_names": list(names),
        "codes": [int(i in code_set) for i in ids],
    }


def latent_payload(a: Analysis, latent: int) -> dict[str, Any]:
    """One latent: its top images under every ranking with their maps, and its histogram.
    Maps (`encode_map`) are keyed by image id; an image in several rankings has one map."""
    if not 0 <= latent < a.n_latents:
        raise VisaeError(f"latent {latent} is out of range (0..{a.n_latents - 1})")
    scale = float(a.table["max_patch"][latent]) or 1.0
    rankings: dict[str, dict[str, list[Any]]] = {}
    maps: dict[str, str] = {}
    for ranking in a.rankings:
        values, images = a.top_arrays(ranking)
        maps_arr = a.top_maps(latent, ranking).reshape(images.shape[1], -1)
        row = np.asarray(images[latent])
        slots = np.flatnonzero(row >= 0)
        rankings[ranking] = {
            "images": row[slots].tolist(),
            "values": _sig(np.asarray(values[latent])[slots]),
        }
        for slot in slots:
            key = str(int(row[slot]))
            if key not in maps:
                maps[key] = encode_map(map_levels(maps_arr[slot], scale))
    counts = np.asarray(a.hist[latent])
    nz = np.flatnonzero(counts)
    edges = a.hist_edges
    if nz.size:
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        hist = {"edges": _sig(edges[lo : hi + 1]), "counts": counts[lo:hi].tolist()}
    else:
        hist = {"edges": [], "counts": []}
    return {
        "latent": latent,
        "scale": scale,
        "levels": MAP_LEVELS,
        "rankings": rankings,
        "maps": maps,
        "hist": hist,
    }


def image_payload(a: Analysis, image: int) -> dict[str, Any]:
    """One image: its strongest latents at every patch (and CLS). `codes.latents` and
    `codes.values` are base64 `[h*w, k]` arrays, row-major: ids of type `code_id_dtype`
    (`id_bytes` wide) and float16 values, both exactly as the artifact stores them."""
    if image not in a.images:
        raise VisaeError(f"image {image} is not in analysis {a.path}")
    doc: dict[str, Any] = {"image": image, "grid": list(a.grid), "codes": None, "cls": None}
    if not a.has_codes(image):
        return doc
    lat, val = a.patch_codes(image)
    ids = code_id_dtype(a.n_latents)
    doc["codes"] = {
        "k": int(lat.shape[1]),
        "id_bytes": ids.itemsize,
        "latents": _b64(lat.astype(ids)),
        "values": _b64(val.astype("<f2")),
    }
    cls = a.cls_codes(image)
    if cls is not None:
        cl, cv = cls
        keep = cl >= 0
        doc["cls"] = {"latents": cl[keep].tolist(), "values": _sig(cv[keep])}
    return doc


def payload(analyses: Sequence[Analysis], key: str) -> dict[str, Any]:
    """The document named `key` (`index`, `a<i>/latents`, `a<i>/images`, `a<i>/latent/<j>`,
    `a<i>/image/<n>`)."""
    m = _KEY.match(key)
    if m is None:
        raise KeyError(key)
    if key == "index":
        return index_payload(analyses)
    idx = int(next(g for g in (m.group(2), m.group(3), m.group(4), m.group(6)) if g is not None))
    if idx >= len(analyses):
        raise KeyError(key)
    a = analyses[idx]
    if m.group(2) is not None:
        return latents_payload(a)
    if m.group(3) is not None:
        return images_payload(a)
    if m.group(5) is not None:
        return latent_payload(a, int(m.group(5)))
    return image_payload(a, int(m.group(7)))
