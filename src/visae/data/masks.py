"""Mask utilities: COCO run-length encodings (uncompressed and compressed), polygons, and the
fraction of each patch of a grid that a mask covers.

COCO RLE runs alternate 0s and 1s starting with 0s, over the mask flattened in column-major
(Fortran) order. The compressed form writes each run as 5-bit groups in ASCII characters 48..111
(bit 0x20: another group follows; bit 0x10 of the last group: sign), and from the fourth run on
stores the difference to the run two places back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from visae.errors import VisaeError


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO run lengths of a 2-D boolean mask."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def counts_to_string(counts: Sequence[int]) -> str:
    """Compressed COCO RLE string of run lengths."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def string_to_counts(s: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(s):
                raise VisaeError("compressed RLE string ends in the middle of a run")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise VisaeError(f"compressed RLE string has an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_counts(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Boolean `[height, width]` mask from uncompressed run lengths."""
    total = int(np.sum(counts)) if len(counts) else 0
    if total != height * width or any(c < 0 for c in counts):
        raise VisaeError(
            f"RLE run lengths sum to {total}, expected {height}x{width}={height * width}"
        )
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    return flat.reshape((height, width), order="F")


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE dict `{"size": [h, w], "counts": str}` of a boolean mask."""
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(rle_counts(mask))}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Mask of a COCO RLE dict whose `counts` is a compressed string or a list of run lengths."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = string_to_counts(counts)
    return decode_counts(counts, h, w)


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons `[[x1, y1, x2, y2, ...], ...]` (union of all polygons).

    Pixel (x, y) is inside when its centre (x + 0.5, y + 0.5) is (even-odd rule, scanline fill).
    pycocotools rasterises boundaries differently and can disagree by a pixel along edges.
    """
    mask = np.zeros((height, width), bool)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise VisaeError(f"COCO polygon needs >= 3 (x, y) points, got {len(poly)} numbers")
        pts = np.asarray(poly, np.float64).reshape(-1, 2)
        x0, y0 = pts[:, 0], pts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        inside = np.zeros((height, width), bool)
        first = max(0, int(np.floor(y0.min())))
        last = min(height, int(np.ceil(y0.max())) + 1)
        for row in range(first, last):
            yc = row + 0.5
            crosses = (y0 <= yc) != (y1 <= yc)
            if not crosses.any():
                continue
            xa, ya, xb, yb = x0[crosses], y0[crosses], x1[crosses], y1[crosses]
            xs = np.sort(xa + (yc - ya) * (xb - xa) / (yb - ya))
            for left, right in zip(xs[0::2], xs[1::2], strict=False):
                start = max(0, int(np.ceil(left - 0.5)))
                stop = min(width, int(np.ceil(right - 0.5)))
                inside[row, start:stop] = True
        mask |= inside
    return mask


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """Mask of a COCO `segmentation` field: polygon list, RLE dict (either counts form)."""
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, dict) and "counts" in seg:
        mask = decode_rle(seg)
        if mask.shape != (height, width):
            raise VisaeError(
                f"RLE size {list(mask.shape)} differs from the image's {[height, width]}"
            )
        return mask
    raise VisaeError(f"unrecognised COCO segmentation of type {type(seg).__name__}")


def bbox_of(mask: np.ndarray) -> list[float]:
    """COCO `[x, y, width, height]` of a mask's pixels (zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min() + 1),
        float(ys.max() - ys.min() + 1),
    ]


def _overlap_weights(n_cells: int, start: float, stop: float, n_pixels: int) -> np.ndarray:
    """`[n_cells, n_pixels]`: fraction of each cell's extent covered by each pixel."""
    edges = start + (stop - start) * np.arange(n_cells + 1) / n_cells
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_pixels)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)
    return overlap / ((stop - start) / n_cells)


def patch_fractions(
    layers: np.ndarray,
    n_layers: int,
    grid: tuple[int, int],
    box: Sequence[float] | None = None,
) -> np.ndarray:
    """Fraction of each patch covered by each layer value of an integer label map.

    `layers` is `[H, W]` with values in `0..n_layers-1`; the patch grid `(rows, cols)` tiles `box`
    `(x0, y0, x1, y1)` in pixel coordinates (default: the whole image), so that a model's
    resize/crop can be followed exactly. Returns `[rows * cols, n_layers]` float32 (rows sum to
    the patch's overlap with the image: 1 inside it).
    """
    rows, cols = grid
    if rows < 1 or cols < 1:
        raise VisaeError(f"patch grid must be positive, got {grid}")
    h, w = layers.shape
    x0, y0, x1, y1 = (0.0, 0.0, float(w), float(h)) if box is None else (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise VisaeError(f"patch box {box} is empty")
    wy = _overlap_weights(rows, y0, y1, h)
    wx = _overlap_weights(cols, x0, x1, w)
    onehot = (layers[None, :, :] == np.arange(n_layers)[:, None, None]).astype(np.float64)
    frac = (wy[None] @ onehot @ wx.T[None]).transpose(1, 2, 0)  # [rows, cols, layers]
    return frac.reshape(rows * cols, n_layers).astype(np.float32)
