"""Automated proxies of human interpretability (Colin et al. 2026): people find a feature easier
to localise and to name when its activation maps are local and its images semantically aligned
at a coarse level. Two proxies per latent, computable without observers:

Locality, from per-image patch aggregates a streaming pass keeps in bounded memory (for every
(image, latent) the sum and the sum of squares of its patch activations). For latent j on
image n with non-negative patch activations a_1..a_P:

    PR = (sum_p a_p)^2 / sum_p a_p^2           participation ratio: effective active patches, [1, P]
    locality(n, j) = 1 - (PR - 1) / (P - 1)    1: all mass on one patch, 0: spread evenly over P

A latent's locality is the mean of locality(n, j) over its top images on which it has a positive
sum; NaN when it has none. A CLS-only SAE has no map (P = 1): refused.

Coarse and fine semantic alignment: `hierarchy.consistency` at the first `coarse_depth` levels
of the taxonomy and on the full path, with its exclusions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from visae.errors import VisaeError
from visae.eval.hierarchy import ImagePaths, consistency

# relative slack on PR in [1, P] for aggregates summed in float32 before the check refuses them
_PR_SLACK = 1e-3


def _check_patches(n_patches: int) -> int:
    if not isinstance(n_patches, int | np.integer) or isinstance(n_patches, bool):
        raise VisaeError(f"n_patches must be an integer, not {n_patches!r}")
    if n_patches < 2:
        raise VisaeError(
            f"n_patches={n_patches}: locality needs an activation map of at least 2 patches "
            "(a CLS-only SAE has none)"
        )
    return int(n_patches)


def _locality(sum_E: np.ndarray, sumsq_E: np.ndarray, n_patches: int) -> np.ndarray:
    """1 - (PR - 1) / (P - 1) per entry with a positive sum, PR clipped to [1, P]."""
    pr = np.clip(sum_E * sum_E / sumsq_E, 1.0, float(n_patches))
    return 1.0 - (pr - 1.0) / (n_patches - 1)


def locality_maps(maps_KP: Any) -> np.ndarray:
    """[K] locality of K dense activation maps of P patches each (flatten a [h, w] grid first);
    NaN for an all-zero map."""
    maps = np.asarray(maps_KP, dtype=np.float64)
    if maps.ndim != 2:
        raise VisaeError(f"activation maps must be [maps, patches], got shape {maps.shape}")
    n_patches = _check_patches(maps.shape[1])
    if not np.isfinite(maps).all():
        raise VisaeError("activation maps hold NaN or infinite values")
    if (maps < 0).any():
        raise VisaeError(f"activation map {np.argwhere(maps < 0)[0, 0]} has negative values")
    sums, sumsq = maps.sum(axis=1), (maps * maps).sum(axis=1)
    out = np.full(len(maps), np.nan)
    on = sums > 0
    out[on] = _locality(sums[on], sumsq[on], n_patches)
    return out


def _shape(matrix: Any) -> tuple[int, ...]:
    return tuple(matrix.shape) if sp.issparse(matrix) else np.shape(matrix)


def _gather(matrix_NL: Any, rows_E: np.ndarray, cols_E: np.ndarray) -> np.ndarray:
    """matrix[rows_E[e], cols_E[e]] as float64, dense or scipy.sparse (0 where not stored)."""
    if not sp.issparse(matrix_NL):
        dense = np.asarray(matrix_NL)
        return dense[rows_E, cols_E].astype(np.float64)
    csr = sp.csr_array(matrix_NL)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()  # sorted columns per row: the keys below come sorted
    n_latents = csr.shape[1]
    keys = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr)) * n_latents
    keys += csr.indices
    wanted = rows_E.astype(np.int64) * n_latents + cols_E
    if not len(keys):
        return np.zeros(len(wanted))
    at = np.searchsorted(keys, wanted).clip(max=len(keys) - 1)
    return np.where(keys[at] == wanted, csr.data[at], 0).astype(np.float64)


def locality(sum_NL: Any, sumsq_NL: Any, n_patches: int, top_LK: np.ndarray) -> np.ndarray:
    """[L] mean locality over each latent's top images (-1: empty slot) with a positive patch
    sum, from the per-image sums `sum_NL` and sums of squares `sumsq_NL` over its P patches
    (dense or scipy.sparse [images, latents]); NaN for a latent with no such image."""
    n_patches = _check_patches(n_patches)
    shape, shape_sq = _shape(sum_NL), _shape(sumsq_NL)
    if len(shape) != 2 or shape != shape_sq:
        raise VisaeError(
            f"patch sums {shape} and sums of squares {shape_sq} must be [images, latents] "
            "of the same shape"
        )
    n_images, n_latents = shape
    top = np.asarray(top_LK)
    if top.ndim != 2 or len(top) != n_latents or not np.issubdtype(top.dtype, np.integer):
        raise VisaeError(
            f"top images must be integer [latents={n_latents}, K], got {top.dtype} {top.shape}"
        )
    bad = (top < -1) | (top >= n_images)
    if bad.any():
        j, k = np.argwhere(bad)[0]
        raise VisaeError(f"latent {j} lists image {top[j, k]} outside 0..{n_images - 1}")
    latents_E, slots_E = np.nonzero(top >= 0)
    images_E = top[latents_E, slots_E].astype(np.int64)
    s = _gather(sum_NL, images_E, latents_E)
    q = _gather(sumsq_NL, images_E, latents_E)
    for what, v in (("patch sum", s), ("patch sum of squares", q)):
        wrong = ~np.isfinite(v) | (v < 0)
        if wrong.any():
            e = int(np.flatnonzero(wrong)[0])
            raise VisaeError(
                f"{what} of image {images_E[e]}, latent {latents_E[e]} is {v[e]}: must be "
                "finite and >= 0 (non-negative activations)"
            )
    on = s > 0
    s, q, images_E, latents_E = s[on], q[on], images_E[on], latents_E[on]
    with np.errstate(divide="ignore"):
        pr = s * s / q
    off = ~((pr >= 1 - _PR_SLACK) & (pr <= n_patches * (1 + _PR_SLACK)))
    if off.any():
        e = int(np.flatnonzero(off)[0])
        raise VisaeError(
            f"image {images_E[e]}, latent {latents_E[e]}: sum {s[e]} and sum of squares {q[e]} "
            f"cannot come from {n_patches} non-negative patch activations"
        )
    counts = np.bincount(latents_E, minlength=n_latents)
    sums = np.bincount(latents_E, weights=_locality(s, q, n_patches), minlength=n_latents)
    return np.divide(sums, counts, out=np.full(n_latents, np.nan), where=counts > 0)


def coarse_fine(
    top_LK: np.ndarray, top_values_LK: np.ndarray, paths: ImagePaths, coarse_depth: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """([L] coarse, [L] fine) semantic alignment: the fraction of a latent's top-image pairs
    whose paths agree on the first `coarse_depth` levels, and on the whole path."""
    coarse = consistency(top_LK, top_values_LK, paths, coarse_depth)
    return coarse, consistency(top_LK, top_values_LK, paths, None)
