"""Hierarchy of SAE latents against a taxonomy of the images (Pach et al. 2025, Matryoshka
hierarchy): are the top images of a latent close in the taxonomy, and are the latents of the
early (coarse) Matryoshka groups shallower than those of the late ones?

Inputs: per latent its top-K images `top_LK` (store indices, best first, -1 in empty slots) and
their image-level activations `top_values_LK` (e.g. the max over patches), as the analysis
artifact's top lists hold them; per store image a taxonomy path (`ImagePaths`).

Rules (METHODS.md, "Matryoshka hierarchy"):
- A path is a tuple of names from the top level down, e.g. (animals, mammals, dogs, dog).
- LCA depth of two images = the length of the common prefix of their paths (0: they differ at
  the top level). A latent's LCA depth = the mean over the K(K-1)/2 unordered pairs of its top
  images (K = 16: 120 pairs).
- Excluded latents (NaN): fewer than K top images (a -1 in `top_LK`) or a K-th top value that is
  not positive (the smallest of the K values: "its 16th image has activation 0").
- A pair with an image of unknown path (None) is skipped; a latent all of whose pairs are
  skipped is NaN. The mean is over the pairs that remain.
- Consistency at depth d = the fraction of those pairs whose paths agree on their first d
  levels: path_a[:d] == path_b[:d], so a path shorter than d is compared whole (d = None: the
  full paths are equal, the "fine" agreement). Same exclusions and skipped pairs.
- Groups: Matryoshka prefix sizes b_1 < ... < b_G = L cut the latents into disjoint groups
  [0, b_1), [b_1, b_2), ...; a group's value is the mean over its defined (non-NaN) latents,
  with a percentile-bootstrap 95% interval over those latents.

Taxonomy sources: `paths_from_scenes` (the largest visible object of a scene image),
`paths_from_sources` (nested ImageFolder directories), `paths_from_json` (a user's file).

Every pair statistic is a gather over `np.triu_indices(K, 1)` for a block of latents at a time:
no Python loop over the pairs of a latent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from visae.errors import VisaeError, first_line
from visae.eval.bootstrap import bootstrap_ci
from visae.sae.config import SAEConfig

if TYPE_CHECKING:
    from visae.data.scene_dataset import SceneDataset

# gathered (latent, pair, level) entries per block: bounds memory for any number of latents
_BLOCK = 1 << 22

TaxonPath = tuple[str, ...]
"""Names from the top level down, e.g. ("animals", "mammals", "dogs", "dog")."""


@dataclass(frozen=True)
class ImagePaths:
    """One taxonomy path per store image (None: unknown), and where the paths came from."""

    paths: tuple[TaxonPath | None, ...]
    source: str

    def __post_init__(self) -> None:
        for i, p in enumerate(self.paths):
            if isinstance(p, str):
                raise VisaeError(f"image {i}: path {p!r} must be a tuple of names, not a string")
        paths = tuple(None if p is None else tuple(p) for p in self.paths)
        for i, p in enumerate(paths):
            if p is not None and (not p or any(not isinstance(x, str) or not x for x in p)):
                raise VisaeError(f"image {i}: path {p!r} must be a non-empty tuple of names")
        object.__setattr__(self, "paths", paths)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_known(self) -> int:
        return sum(p is not None for p in self.paths)

    @property
    def max_depth(self) -> int:
        """The longest path's length (0 when no path is known)."""
        return max((len(p) for p in self.paths if p is not None), default=0)

    @cached_property
    def _prefix_ids_ND(self) -> np.ndarray:
        """[N, max_depth] int64: an id per distinct prefix path[:d + 1], -1 past the end (and
        for unknown paths). Equal ids at level d mean the paths agree on levels 0..d."""
        out = np.full((len(self.paths), max(self.max_depth, 1)), -1, dtype=np.int64)
        ids: dict[TaxonPath, int] = {}
        for i, p in enumerate(self.paths):
            for d in range(len(p) if p is not None else 0):
                out[i, d] = ids.setdefault(p[: d + 1], len(ids))
        return out

    def _keys_N(self, depth: int | None) -> np.ndarray:
        """[N] int64: an id per distinct path[:depth] (the whole path for None), -1 unknown."""
        ids: dict[TaxonPath, int] = {}
        return np.array(
            [-1 if p is None else ids.setdefault(p[:depth], len(ids)) for p in self.paths],
            dtype=np.int64,
        )


# ---------------------------------------------------------------- taxonomy sources


def paths_from_scenes(scenes: SceneDataset, dataset_index: Sequence[int]) -> ImagePaths:
    """Scene images by their largest visible object: the item path (category folders, then
    the item) of the object with the most visible pixels, ties to the earlier-drawn object.

    A record's `area` is the object's visible pixel count in the full-resolution label map,
    after the objects drawn over it; `dataset_index[i]` is store image i's scene (the store
    metadata's `dataset_index`)."""
    paths: list[TaxonPath | None] = []
    for i, n in enumerate(dataset_index):
        if not 0 <= int(n) < len(scenes.records):
            raise VisaeError(
                f"store image {i}: dataset index {n} is not a scene of {scenes.folder} "
                f"(0..{len(scenes.records) - 1})"
            )
        objects = scenes.records[int(n)]["objects"]
        areas = [int(o["area"]) for o in objects]
        if not areas or max(areas) <= 0:
            paths.append(None)
            continue
        largest = objects[areas.index(max(areas))]  # index(): the first of equal areas
        paths.append(tuple(largest["item"].split("/")))
    return ImagePaths(tuple(paths), f"scenes:{scenes.folder} (largest visible object)")


def paths_from_sources(sources: Sequence[str]) -> ImagePaths:
    """Nested ImageFolder directories: an image's path is the folders of its source relative
    to the root (`animals/mammals/dog/x.jpg` -> (animals, mammals, dog)); None at the root."""
    paths: list[TaxonPath | None] = []
    for i, source in enumerate(sources):
        parts = PurePosixPath(source).parts
        if not source or PurePosixPath(source).is_absolute() or ".." in parts:
            raise VisaeError(
                f"store image {i}: source {source!r} is not a path relative to the image folder"
            )
        paths.append(tuple(parts[:-1]) or None)
    return ImagePaths(tuple(paths), "folders")


class _Images:
    """Resolves a JSON file's image references: a store metadata source, else a store index
    (a decimal string, or an integer in a tree's lists)."""

    def __init__(self, file: Path, sources: Sequence[str]) -> None:
        self.file, self.n = file, len(sources)
        self.by_source: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            self.by_source.setdefault(str(s), []).append(i)

    def find(self, ref: Any) -> int | None:
        if isinstance(ref, str) and ref in self.by_source:
            return self.by_source[ref][0]
        if isinstance(ref, str) and ref.isascii() and ref.isdecimal():
            ref = int(ref)
        if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < self.n:
            return ref
        return None

    def index(self, ref: Any) -> int:
        if isinstance(ref, str) and len(self.by_source.get(ref, ())) > 1:
            raise VisaeError(
                f"{self.file}: source {ref!r} names several store images "
                f"{self.by_source[ref]}: refer to them by store index"
            )
        i = self.find(ref)
        if i is None:
            raise VisaeError(
                f"{self.file}: image {ref!r} is not in the store (neither a metadata source nor "
                f"a store index 0..{self.n - 1})"
            )
        return i


def paths_from_json(file: str | Path, sources: Sequence[str]) -> ImagePaths:
    """A user's taxonomy file: a mapping `{image: "a/b/c" or ["a", "b", "c"]}`, or a nested
    tree `{"animals": {"dogs": ["img1.jpg", ...]}}` whose leaves are lists of images. An image
    is a store metadata source, else a store index; images the file omits get None.

    A file whose values are all lists is a mapping when every key is a store image, else a
    one-level tree when every listed item is; any object value makes it a tree."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VisaeError(f"cannot read taxonomy file {file}: {first_line(exc)}") from None
    except json.JSONDecodeError as exc:
        raise VisaeError(f"taxonomy file {file} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise VisaeError(f"taxonomy file {file} must hold a JSON object, not {_kind(data)}")
    images = _Images(file, sources)
    values = list(data.values())
    if any(isinstance(v, dict) for v in values):
        entries = _tree_entries(data, images)
    elif (
        values
        and all(isinstance(v, list) for v in values)
        and not all(images.find(k) is not None for k in data)
    ):
        if not all(images.find(x) is not None for v in values for x in v):
            key = next(k for k in data if images.find(k) is None)
            ref = next(x for v in values for x in v if images.find(x) is None)
            raise VisaeError(
                f"{file} is neither a mapping of images to paths (key {key!r} is not a store "
                f"image) nor a one-level tree of images (item {ref!r} is not a store image)"
            )
        entries = _tree_entries(data, images)
    else:
        entries = [(k, images.index(k), _mapping_path(file, k, v)) for k, v in data.items()]
    paths: list[TaxonPath | None] = [None] * len(sources)
    named: dict[int, Any] = {}
    for ref, i, path in entries:
        if i in named:
            raise VisaeError(
                f"{file}: store image {i} is listed twice (as {named[i]!r} and {ref!r})"
            )
        named[i] = ref
        paths[i] = path
    if not named:
        raise VisaeError(f"taxonomy file {file} gives no image a path")
    return ImagePaths(tuple(paths), f"json:{file}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def _mapping_path(file: Path, ref: str, value: Any) -> TaxonPath:
    parts = value.split("/") if isinstance(value, str) else value
    if (
        not isinstance(parts, list)
        or not parts
        or any(not isinstance(x, str) or not x or "/" in x for x in parts)
    ):
        raise VisaeError(
            f"{file}: the path of image {ref!r} must be 'a/b/c' or a list of non-empty names "
            f"without '/', not {value!r}"
        )
    return tuple(parts)


def _tree_entries(tree: dict[str, Any], images: _Images) -> list[tuple[Any, int, TaxonPath]]:
    """(reference, store index, path) of every image under the tree, depth first."""
    out: list[tuple[Any, int, TaxonPath]] = []
    stack: list[tuple[TaxonPath, Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        where = "/".join(path) or "(root)"
        if isinstance(node, dict):
            for name, child in node.items():
                if not name or "/" in name:
                    raise VisaeError(
                        f"{images.file}: node {where!r} has a child named {name!r}: names "
                        "must be non-empty and without '/'"
                    )
                stack.append(((*path, name), child))
        elif isinstance(node, list) and path:
            for ref in node:
                if not isinstance(ref, str | int) or isinstance(ref, bool):
                    raise VisaeError(
                        f"{images.file}: node {where!r} lists {ref!r}: images are sources "
                        "or store indices"
                    )
                out.append((ref, images.index(ref), path))
        else:
            raise VisaeError(
                f"{images.file}: node {where!r} must be an object of nodes or a list of "
                f"images, not {_kind(node)}"
            )
    return out


# ---------------------------------------------------------------- per-latent pair statistics


def _top_images(top_LK: Any, top_values_LK: Any, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(top images [L, K] int64, included [L] bool) after checking them against the store."""
    top = np.asarray(top_LK)
    values = np.asarray(top_values_LK, dtype=np.float64)
    if top.ndim != 2 or top.shape[1] < 2:
        raise VisaeError(f"top images must be [latents, K >= 2], got shape {top.shape}")
    if values.shape != top.shape:
        raise VisaeError(f"top values {values.shape} and top images {top.shape} differ in shape")
    if not np.issubdtype(top.dtype, np.integer):
        raise VisaeError(f"top images must be integer store indices, not {top.dtype}")
    top = top.astype(np.int64)
    bad = (top < -1) | (top >= n_images)
    if bad.any():
        j, k = np.argwhere(bad)[0]
        raise VisaeError(
            f"latent {j} lists image {top[j, k]} outside the store's 0..{n_images - 1}"
        )
    if np.isnan(values).any():
        raise VisaeError(f"top values of latent {np.argwhere(np.isnan(values))[0, 0]} hold NaN")
    ordered = np.sort(top, axis=1)
    repeat = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeat.any():
        j, k = np.argwhere(repeat)[0]
        raise VisaeError(f"latent {j} lists image {ordered[j, k + 1]} twice in its top images")
    included = (top >= 0).all(axis=1) & (values.min(axis=1) > 0)
    return top, included


def _pair_mean(
    top_LK: Any,
    top_values_LK: Any,
    paths: ImagePaths,
    per_level: int,
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """[L] mean of score(a_BM, b_BM) over each included latent's pairs of known paths, NaN
    where none; `per_level` = gathered entries per pair, for the block size."""
    top, included = _top_images(top_LK, top_values_LK, len(paths))
    known_N = np.array([p is not None for p in paths.paths], dtype=bool)
    first, second = np.triu_indices(top.shape[1], 1)
    out = np.full(len(top), np.nan)
    rows = np.flatnonzero(included)
    step = max(1, _BLOCK // (len(first) * per_level))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        a_BM, b_BM = top[block][:, first], top[block][:, second]
        valid_BM = known_N[a_BM] & known_N[b_BM]
        counts = valid_BM.sum(axis=1)
        sums = np.where(valid_BM, score(a_BM, b_BM), 0).sum(axis=1, dtype=np.float64)
        out[block] = np.divide(sums, counts, out=np.full(len(block), np.nan), where=counts > 0)
    return out


def lca_depth(top_LK: np.ndarray, top_values_LK: np.ndarray, paths: ImagePaths) -> np.ndarray:
    """[L] float64 mean LCA depth (common path prefix length) over the unordered pairs of each
    latent's top images; NaN for excluded latents and those with no pair of known paths."""
    prefix_ND = paths._prefix_ids_ND

    def common_prefix(a_BM: np.ndarray, b_BM: np.ndarray) -> np.ndarray:
        pa, pb = prefix_ND[a_BM], prefix_ND[b_BM]
        return ((pa == pb) & (pa >= 0)).sum(axis=2)

    return _pair_mean(top_LK, top_values_LK, paths, prefix_ND.shape[1], common_prefix)


def consistency(
    top_LK: np.ndarray, top_values_LK: np.ndarray, paths: ImagePaths, depth: int | None
) -> np.ndarray:
    """[L] fraction of each latent's top-image pairs whose paths agree on their first `depth`
    levels (None: the whole path); exclusions and skipped pairs as in `lca_depth`."""
    if depth is not None and (
        not isinstance(depth, int | np.integer) or isinstance(depth, bool) or depth < 1
    ):
        raise VisaeError(f"depth must be a positive integer or None (the full path), not {depth!r}")
    keys_N = paths._keys_N(None if depth is None else int(depth))

    def agree(a_BM: np.ndarray, b_BM: np.ndarray) -> np.ndarray:
        return keys_N[a_BM] == keys_N[b_BM]

    return _pair_mean(top_LK, top_values_LK, paths, 1, agree)


# ---------------------------------------------------------------- Matryoshka groups


def matryoshka_boundaries(n_latents: int, fractions: Sequence[float]) -> list[int]:
    """Cumulative prefix sizes in latents, exactly as the SAE's Matryoshka loss cuts them
    (`SAEConfig.matryoshka_sizes`: round(f * n_latents), at least 1; fractions end with 1)."""
    cfg = SAEConfig(arch="topk", d=1, n_latents=n_latents, k=1, matryoshka=tuple(fractions))
    return list(cfg.matryoshka_sizes())


def group_means(
    values_L: np.ndarray,
    boundaries: Sequence[int],
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per Matryoshka group [start, stop): `start`, `stop`, `n_latents`, `n` (defined, non-NaN
    latents), `mean` over them (None when n = 0) and `ci`, the percentile-bootstrap interval
    [lo, hi] at `level` (None when n < 2), JSON-ready."""
    values = np.asarray(values_L, dtype=np.float64)
    if values.ndim != 1:
        raise VisaeError(f"values must be one per latent, got shape {values.shape}")
    bounds = [int(b) for b in boundaries]
    if (
        not bounds
        or bounds[-1] != len(values)
        or any(b <= a for a, b in zip([0, *bounds[:-1]], bounds, strict=True))
    ):
        raise VisaeError(
            f"group boundaries {bounds} must increase strictly from above 0 to the number of "
            f"latents, {len(values)}"
        )
    if np.isinf(values).any():
        raise VisaeError(f"value of latent {np.flatnonzero(np.isinf(values))[0]} is infinite")
    out: list[dict[str, Any]] = []
    for start, stop in zip([0, *bounds[:-1]], bounds, strict=True):
        group = values[start:stop]
        defined = group[~np.isnan(group)]
        mean, ci = None, None
        if len(defined) >= 2:
            mean, lo, hi = bootstrap_ci(defined, np.mean, n_resamples, level, seed)
            ci = [lo, hi]
        elif len(defined) == 1:
            mean = float(defined[0])
        out.append(
            {
                "start": start,
                "stop": stop,
                "n_latents": stop - start,
                "n": len(defined),
                "mean": mean,
                "ci": ci,
            }
        )
    return out
