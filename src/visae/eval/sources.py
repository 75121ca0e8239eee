"""Where the evaluation suite's ground truth comes from: binary concept labels per store image
(and per patch, where the source has masks) and image pairs that differ in one concept, each
named by a spec string and aligned with a store's image indices.

Concept sources (`load_concepts`):
- `auto` (or None): `scenes` when the store's dataset is a scene folder, `coco` for a COCO
  instances file, else `labels`.
- `labels` or `labels:PREFIX`: every label in the store's metadata, or only those starting
  with PREFIX (kept whole: `labels:attr:` scores `attr:has_bill_shape::dagger`). Aliases:
  `cub` = `labels:attr:` (CUB's 312 attributes; its `class:` labels left out), `imagefolder`
  and `hf` = `labels` (class folder names; ClassLabel names, `column=name` when a dataset has
  several such columns). No masks.
- `scenes`: the scene folder's exact concepts (its vocabulary, in its order), with masks.
- `coco`: the COCO object categories (category-id order), an image labelled with every
  category it has an annotation of (crowd ones included), with masks.
- `csv:FILE`: header `image,concept`, one row per positive; `image` is a store index (all
  digits) or a metadata `source`, matched as pair images are (below); a repeated row counts
  once. The concepts are the ones the file names. No masks.

Rules:
- Store image s is dataset image `metadata[s]["dataset_index"]` (the store index itself when
  no image carries one and none was skipped), through any `Subset` down to the scene or COCO
  dataset: rows follow the images the store really holds.
- A concept with fewer than `min_positives` positive images in the store is excluded: listed in
  `excluded`, never scored. Labels sources only know the labels that occur in the store.
- Patch labels: the store's patch grid at a layer tiles the part of the original image the
  model saw (`visae.geometry.preprocessing_box` of the store's preprocessing), rows image-major
  then patches row-major as the store's tokens; a patch carries a concept when the concept's
  mask (the union of its masks) covers at least half of the patch's area (to within 1e-6, for
  float rounding; area outside the image counts as uncovered).

Pair sources (`load_pairs`), each pair x -> x' with an old and a new concept (none allowed on one
side only):
- `scenes`: the scene folder's pairs; of the concepts a pair lists at several taxonomy levels,
  the most specific (deepest path) among the scored names; removal pairs have new = none.
  Scene image ids are dataset indices, mapped to store indices through `dataset_index`; a pair
  whose image lies outside the dataset subset the store was extracted from is dropped.
- `syncub:FILE`: synCUB's metadata.csv (`pair_id, orig_image, syn_image, class_id, class_name,
  old_attr, new_attr, ...`); attribute names match a concept spelled `name` or `attr:name`.
- `syncoco:FILE`: synCOCO's metadata.csv (`pair_id, orig_image, syn_image, coco_idx,
  removed_cls_idx, removed_class, ...`): removal-only, old = removed_class, new = none.
- `csv:FILE`: header `image_a,image_b,old,new`; an empty old or new is none; pair id `line N`.
- A table's header must hold every column of its layout (more are ignored); a row with more
  fields than the header is an error naming its line.
- Images of table sources are metadata `source` strings: an exact match, else the one store
  image whose source ends with `/<image>`; none or several is an error naming the pair.
- A concept the source does not know is an error naming the pair; one it excluded for lack of
  positives drops the pair into `dropped`, with the reason. Old == new, both none, or x == x'
  is an error naming the pair; so is a table without rows. A pair set may be empty (a scene
  folder without pairs, or every pair dropped: `dropped` says why).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from visae.data import CocoDataset, SceneDataset, Subset
from visae.data.base import ImageDataset
from visae.errors import VisaeError
from visae.geometry import preprocessing_box
from visae.store.dataset import open_dataset, spec_from_name
from visae.store.reader import ActivationStore

CONCEPT_SPECS = (
    "auto",
    "labels",
    "labels:PREFIX",
    "cub",
    "imagefolder",
    "hf",
    "scenes",
    "coco",
    "csv:FILE",
)
PAIR_SPECS = ("scenes", "syncub:FILE", "syncoco:FILE", "csv:FILE")
PATCH_COVER = 0.5
_ROUNDING = 1e-6
_ALIASES = {"cub": "labels:attr:", "imagefolder": "labels", "hf": "labels"}
_CONCEPT_COLUMNS = ("image", "concept")
_SYNCUB_COLUMNS = (
    "pair_id",
    "orig_image",
    "syn_image",
    "class_id",
    "class_name",
    "old_attr",
    "new_attr",
    "old_attr_idx",
    "new_attr_idx",
    "orig_attr_idx",
    "syn_attr_idx",
)
_SYNCOCO_COLUMNS = (
    "pair_id",
    "orig_image",
    "syn_image",
    "coco_idx",
    "removed_cls_idx",
    "removed_class",
    "orig_labels",
    "syn_labels",
)
_PAIR_COLUMNS = ("image_a", "image_b", "old", "new")


# ---------------------------------------------------------------- the images behind a store


@dataclass(frozen=True)
class _Images:
    """Store images located in the dataset that holds their masks and pairs."""

    dataset: SceneDataset | CocoDataset
    base_N: np.ndarray  # store image -> index in `dataset`
    subset: frozenset[int] | None  # the dataset indices the store was extracted from (None: all)


def _open(store: ActivationStore, dataset: ImageDataset | str | None) -> ImageDataset:
    """The store's dataset: reopened from its spec (or the spec given), or the object given,
    checked to be the same images."""
    if dataset is None or isinstance(dataset, str):
        return open_dataset(store, dataset, progress=False)
    want = str(store.dataset["fingerprint"])
    if dataset.fingerprint != want:
        raise VisaeError(
            f"dataset {dataset.name} is not the one store {store.path} was extracted from "
            f"(fingerprint {dataset.fingerprint[:12]}, the store's {want[:12]})"
        )
    extracted = store.n_images + len(store.skipped)
    if len(dataset) != extracted:
        raise VisaeError(
            f"dataset {dataset.name} has {len(dataset)} images; store {store.path} was "
            f"extracted from {extracted}"
        )
    return dataset


def _unwrap(dataset: ImageDataset) -> tuple[ImageDataset, np.ndarray | None]:
    """The dataset under any `Subset`s, and subset index -> its index (None: no subset)."""
    to_base = None
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices, dtype=np.int64)
        to_base = indices if to_base is None else indices[to_base]
        dataset = dataset.dataset
    return dataset, to_base


def _dataset_indices(store: ActivationStore, metadata: list[dict[str, Any]]) -> np.ndarray:
    """Each store image's index in the dataset it was extracted from."""
    have = ["dataset_index" in m for m in metadata]
    if not any(have) and not store.skipped:
        return np.arange(len(metadata), dtype=np.int64)
    if not all(have):
        s = have.index(False)
        raise VisaeError(
            f"store {store.path}: image {s} has no dataset_index in its metadata, and the store "
            "skipped images: its dataset images cannot be told"
        )
    index_N = np.array([int(m["dataset_index"]) for m in metadata], dtype=np.int64)
    _, first, counts = np.unique(index_N, return_index=True, return_counts=True)
    if (counts > 1).any():
        s = int(first[np.flatnonzero(counts > 1)[0]])
        raise VisaeError(
            f"store {store.path}: dataset image {index_N[s]} appears more than once "
            f"(store image {s} and another)"
        )
    return index_N


def _locate(
    store: ActivationStore,
    metadata: list[dict[str, Any]],
    dataset: ImageDataset,
    kind: type[SceneDataset] | type[CocoDataset],
    spec: str,
) -> _Images:
    base, to_base = _unwrap(dataset)
    if not isinstance(base, kind):
        raise VisaeError(
            f"{spec} needs a {kind.__name__} behind store {store.path}; its dataset is "
            f"{dataset.name} ({type(base).__name__})"
        )
    index_N = _dataset_indices(store, metadata)
    if len(index_N) and (index_N.min() < 0 or index_N.max() >= len(dataset)):
        s = int(np.flatnonzero((index_N < 0) | (index_N >= len(dataset)))[0])
        raise VisaeError(
            f"store {store.path}: image {s} has dataset_index {index_N[s]}, outside dataset "
            f"{dataset.name} ({len(dataset)} images)"
        )
    if to_base is None:
        return _Images(base, index_N, None)
    return _Images(base, to_base[index_N], frozenset(int(b) for b in to_base))


def _image_size(dataset: SceneDataset | CocoDataset, i: int) -> tuple[int, int]:
    """(width, height) of an original image, read from the annotations (no pixels)."""
    if isinstance(dataset, SceneDataset):
        return dataset.config.size, dataset.config.size
    record = dataset.images[i]
    return int(record["width"]), int(record["height"])


# ---------------------------------------------------------------- concept labels


@dataclass(frozen=True)
class _Masks:
    """What per-patch labels need: the masked dataset, its columns of the scored concepts,
    and the store's geometry."""

    images: _Images
    columns_C: np.ndarray  # scored concept -> column of the dataset's patch_labels
    store: ActivationStore

    def patch_labels(self, images: Any, layer: int) -> sp.csr_matrix:
        images_M = np.asarray(images)
        if images_M.ndim != 1 or not (
            images_M.size == 0 or np.issubdtype(images_M.dtype, np.integer)
        ):
            raise VisaeError(f"images must be a 1-D array of store indices, got {images_M!r}")
        n = len(self.images.base_N)
        bad = np.flatnonzero((images_M < 0) | (images_M >= n))
        if bad.size:
            raise VisaeError(f"image {images_M[bad[0]]} is out of range (store has {n} images)")
        grid = self.store.layout(layer).grid
        n_patches = grid[0] * grid[1]
        if n_patches == 0:
            raise VisaeError(f"store {self.store.path} holds no patch tokens at layer {layer}")
        preprocessing = self.store.backbone["preprocessing"]
        dataset = self.images.dataset
        rows, cols = [], []
        for m, s in enumerate(images_M):
            b = int(self.images.base_N[s])
            box = preprocessing_box(preprocessing, *_image_size(dataset, b))
            frac_PC = dataset.patch_labels(b, grid, box)[:, self.columns_C]
            p, c = np.nonzero(frac_PC >= PATCH_COVER - _ROUNDING)
            rows.append(m * n_patches + p)
            cols.append(c)
        r = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        c = np.concatenate(cols) if cols else np.empty(0, dtype=np.int64)
        return sp.csr_matrix(
            (np.ones(len(r), dtype=bool), (r, c)),
            shape=(len(images_M) * n_patches, len(self.columns_C)),
            dtype=bool,
        )


@dataclass(frozen=True)
class ConceptLabels:
    """Binary concept labels of every store image, from one named source."""

    names: tuple[str, ...]  # the scored concepts: columns of labels_NC
    labels_NC: np.ndarray  # bool [store images, concepts]
    source: str  # canonical concept spec
    excluded: tuple[str, ...]  # the source's concepts with too few positives: never scored
    min_positives: int = 1
    _masks: _Masks | None = field(default=None, repr=False, compare=False)

    @property
    def has_masks(self) -> bool:
        return self._masks is not None

    def patch_labels(self, images: Any, layer: int) -> sp.csr_matrix:
        """Bool `[len(images) * patches, concepts]`, rows image-major then patches row-major as
        the store's patch tokens at `layer`: a patch carries a concept when the concept covers
        at least half of its area (within 1e-6), measured on the part of the original image the
        model saw, so that patches line up with the store's tokens."""
        if self._masks is None:
            raise VisaeError(f"concept source {self.source!r} has no masks: no patch labels")
        return self._masks.patch_labels(images, layer)


def _check_min_positives(min_positives: Any) -> int:
    if (
        isinstance(min_positives, bool)
        or not isinstance(min_positives, int | np.integer)
        or min_positives < 1
    ):
        raise VisaeError(f"min_positives must be a positive integer, got {min_positives!r}")
    return int(min_positives)


def _auto(store: ActivationStore, dataset: ImageDataset | str | None) -> str:
    """`scenes`, `coco` or `labels`, from the dataset's type or spec (nothing is opened)."""
    if dataset is not None and not isinstance(dataset, str):
        base = _unwrap(dataset)[0]
        if isinstance(base, SceneDataset):
            return "scenes"
        return "coco" if isinstance(base, CocoDataset) else "labels"
    spec = dataset or store.dataset_spec or spec_from_name(str(store.dataset["name"]))
    head, sep, _ = spec.rpartition("#")
    spec = head if sep else spec
    kind = spec.partition(":")[0]
    if kind == "scenes" or (Path(spec) / "scenes.json").is_file():
        return "scenes"
    return "coco" if kind == "coco" else "labels"


def _from_labels(
    store: ActivationStore, metadata: list[dict[str, Any]], prefix: str
) -> tuple[list[str], np.ndarray]:
    if not any("labels" in m for m in metadata):
        raise VisaeError(
            f"store {store.path} has no labels in its image metadata: use another concept "
            "source (csv:FILE, scenes, coco)"
        )
    for s, m in enumerate(metadata):
        labels = m.get("labels")
        if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
            raise VisaeError(
                f"store {store.path}: image {s} has no list of label strings in its metadata "
                f"(labels: {labels!r})"
            )
    names = sorted({v for m in metadata for v in m["labels"] if v.startswith(prefix)})
    if not names:
        raise VisaeError(f"no label of store {store.path} starts with {prefix!r}")
    column = {c: k for k, c in enumerate(names)}
    labels_NC = np.zeros((len(metadata), len(names)), dtype=bool)
    for s, m in enumerate(metadata):
        labels_NC[s, [column[v] for v in m["labels"] if v.startswith(prefix)]] = True
    return names, labels_NC


def _coco_labels(images: _Images) -> tuple[list[str], np.ndarray]:
    coco = images.dataset
    assert isinstance(coco, CocoDataset)
    names = coco.category_names()
    if len(set(names)) != len(names):
        twice = sorted({c for c in names if names.count(c) > 1})
        raise VisaeError(f"COCO file {coco.annotations_path} repeats category names {twice}")
    column = {cid: k for k, cid in enumerate(sorted(coco.categories))}
    labels_NC = np.zeros((len(images.base_N), len(names)), dtype=bool)
    for s, b in enumerate(images.base_N):
        labels_NC[s, [column[int(a["category_id"])] for a in coco.annotations(int(b))]] = True
    return names, labels_NC


def _read_table(path: Path, required: Sequence[str], what: str) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank row of a CSV file with the required columns."""
    if not path.is_file():
        raise VisaeError(f"{what} {path} not found")
    rows: list[tuple[int, dict]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise VisaeError(
                    f"{what} {path}: header lacks {', '.join(missing)} "
                    f"(expected the columns {','.join(required)})"
                )
            reader.fieldnames = header
            for row in reader:
                if None in row:
                    raise VisaeError(f"{path}:{reader.line_num}: more fields than the header")
                cells = {k: (v or "").strip() for k, v in row.items()}
                if any(cells.values()):
                    rows.append((reader.line_num, cells))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise VisaeError(f"{what} {path} is not a readable CSV file: {exc}") from None
    return rows


class _Sources:
    """Store images by metadata `source`: exactly, and by every path suffix of whole
    components (`a/b/c.jpg` is found as `b/c.jpg` and `c.jpg`)."""

    def __init__(self, store: ActivationStore, metadata: list[dict[str, Any]]) -> None:
        self.store = store
        self.sources = [str(m.get("source", "")) for m in metadata]
        self.exact: dict[str, list[int]] = {}
        self.suffix: dict[str, list[int]] = {}
        for s, source in enumerate(self.sources):
            self.exact.setdefault(source, []).append(s)
            parts = source.split("/")
            for k in range(1, len(parts)):
                self.suffix.setdefault("/".join(parts[k:]), []).append(s)

    def find(self, image: str, where: str) -> int:
        hits = self.exact.get(image) or self.suffix.get(image, [])
        if not hits:
            raise VisaeError(
                f"{where}: image {image!r} is not in store {self.store.path} (no image source "
                "is it or ends with it)"
            )
        if len(hits) > 1:
            a, b = hits[:2]
            raise VisaeError(
                f"{where}: image {image!r} is ambiguous in store {self.store.path}: images "
                f"{a} ({self.sources[a]}) and {b} ({self.sources[b]}) match"
            )
        return hits[0]


def _csv_labels(
    path: Path, store: ActivationStore, metadata: list[dict[str, Any]]
) -> tuple[list[str], np.ndarray]:
    sources = _Sources(store, metadata)
    positives: dict[str, set[int]] = {}
    for line, row in _read_table(path, _CONCEPT_COLUMNS, "concept table"):
        where = f"{path}:{line}"
        image, concept = row["image"], row["concept"]
        if not image or not concept:
            raise VisaeError(f"{where}: empty image or concept")
        if image.isdigit():
            s = int(image)
            if s >= len(metadata):
                raise VisaeError(
                    f"{where}: image {s} is out of range (store {store.path} has "
                    f"{len(metadata)} images)"
                )
        else:
            s = sources.find(image, where)
        positives.setdefault(concept, set()).add(s)
    if not positives:
        raise VisaeError(f"concept table {path} has no rows")
    names = sorted(positives)
    labels_NC = np.zeros((len(metadata), len(names)), dtype=bool)
    for k, c in enumerate(names):
        labels_NC[sorted(positives[c]), k] = True
    return names, labels_NC


def load_concepts(
    spec: str | None,
    store: ActivationStore,
    dataset: ImageDataset | str | None = None,
    min_positives: int = 1,
) -> ConceptLabels:
    """Concept labels of every store image from a concept source (module docstring: specs and
    rules). `dataset` overrides the dataset the store records (an object or a dataset spec),
    for the sources that read it (scenes, coco)."""
    min_positives = _check_min_positives(min_positives)
    if store.n_images == 0:
        raise VisaeError(f"store {store.path} holds no images")
    chosen = "auto" if spec is None else spec.strip()
    chosen = _ALIASES.get(chosen, chosen)
    if chosen == "auto":
        chosen = _auto(store, dataset)
    metadata = store.metadata()
    images: _Images | None = None
    if chosen == "labels" or chosen.startswith("labels:"):
        prefix = chosen.partition(":")[2]
        names, labels_NC = _from_labels(store, metadata, prefix)
        chosen = f"labels:{prefix}" if prefix else "labels"
    elif chosen == "scenes":
        images = _locate(store, metadata, _open(store, dataset), SceneDataset, "scenes")
        assert isinstance(images.dataset, SceneDataset)
        names = list(images.dataset.concepts)
        labels_NC = images.dataset.concept_matrix()[images.base_N]
    elif chosen == "coco":
        images = _locate(store, metadata, _open(store, dataset), CocoDataset, "coco")
        names, labels_NC = _coco_labels(images)
    elif chosen.startswith("csv:") and chosen[4:]:
        path = Path(chosen[4:]).expanduser()
        names, labels_NC = _csv_labels(path, store, metadata)
        chosen = f"csv:{path.resolve()}"
    else:
        raise VisaeError(
            f"unknown concept source {spec!r}: expected one of {', '.join(CONCEPT_SPECS)}"
        )
    keep_C = labels_NC.sum(axis=0) >= min_positives
    if not keep_C.any():
        raise VisaeError(
            f"concept source {chosen!r}: none of its {len(names)} concepts has "
            f"{min_positives} positive images in store {store.path}"
        )
    masks = None
    if images is not None:
        masks = _Masks(images, np.flatnonzero(keep_C), store)
    return ConceptLabels(
        names=tuple(c for c, k in zip(names, keep_C, strict=True) if k),
        labels_NC=np.ascontiguousarray(labels_NC[:, keep_C]),
        source=chosen,
        excluded=tuple(c for c, k in zip(names, keep_C, strict=True) if not k),
        min_positives=min_positives,
        _masks=masks,
    )


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairSet:
    """Image pairs x -> x' as store indices, their old and new concepts as columns of the
    `ConceptLabels` they were loaded against (-1: none)."""

    first_P: np.ndarray  # int64 store index of x
    second_P: np.ndarray  # int64 store index of x'
    old_P: np.ndarray  # int64 concept column, -1 for none
    new_P: np.ndarray
    pair_ids: tuple[str, ...]
    source: str  # canonical pair spec
    dropped: tuple[str, ...]  # "pair ...: why", for pairs left out

    def __len__(self) -> int:
        return len(self.pair_ids)


@dataclass(frozen=True)
class _Pair:
    """One pair as a source gives it: concepts as candidate names (empty: none)."""

    pair_id: str
    where: str  # how errors name it
    first: int
    second: int
    old: tuple[str, ...]
    new: tuple[str, ...]


class _Scored:
    """Name lookups of a `ConceptLabels`, built once per pair source."""

    def __init__(self, labels: ConceptLabels) -> None:
        self.labels = labels
        self.column = {c: k for k, c in enumerate(labels.names)}
        self.excluded = frozenset(labels.excluded)


def _depth(concept: str) -> int:
    """Taxonomy depth of a concept name (`object:a/b` is 2), for the most specific choice."""
    return concept.partition(":")[2].count("/") + 1


def _column(pair: _Pair, role: str, candidates: tuple[str, ...], concepts: _Scored) -> int | str:
    """The concept column of one side of a pair (-1: none), or why the pair is dropped."""
    if not candidates:
        return -1
    scored = [c for c in candidates if c in concepts.column]
    if scored:
        return concepts.column[max(scored, key=_depth)]  # max keeps the first of equal depth
    excluded = [c for c in candidates if c in concepts.excluded]
    if excluded:
        return (
            f"{pair.where}: {role} concept {excluded[-1]!r} excluded by concept source "
            f"{concepts.labels.source!r} (fewer than {concepts.labels.min_positives} positive "
            "images in the store)"
        )
    shown = candidates[0] if len(candidates) == 1 else list(candidates)
    raise VisaeError(
        f"{pair.where}: {role} concept {shown!r} is unknown to concept source "
        f"{concepts.labels.source!r}"
    )


def _scene_pairs(
    store: ActivationStore,
    metadata: list[dict[str, Any]],
    concepts: ConceptLabels,
    dataset: ImageDataset | str | None,
) -> tuple[list[_Pair], list[str]]:
    held = concepts._masks
    if dataset is None and held is not None and isinstance(held.images.dataset, SceneDataset):
        images = held.images
    else:
        images = _locate(store, metadata, _open(store, dataset), SceneDataset, "scene pairs")
    assert isinstance(images.dataset, SceneDataset)
    store_of = {int(b): s for s, b in enumerate(images.base_N)}
    pairs, dropped = [], []
    for p in images.dataset.pairs:
        where = f"pair {p.pair}"
        subset = images.subset
        outside = [i for i in (p.image_a, p.image_b) if subset is not None and i not in subset]
        if outside:
            dropped.append(
                f"{where}: scene image {outside[0]} is outside the dataset subset store "
                f"{store.path} was extracted from"
            )
            continue
        for i in (p.image_a, p.image_b):
            if i not in store_of:
                raise VisaeError(
                    f"{where}: scene image {i} is not in store {store.path} (skipped at extraction)"
                )
        pairs.append(
            _Pair(str(p.pair), where, store_of[p.image_a], store_of[p.image_b], p.old, p.new)
        )
    return pairs, dropped


def _table_pairs(
    kind: str, path: Path, store: ActivationStore, metadata: list[dict[str, Any]]
) -> list[_Pair]:
    required = {"syncub": _SYNCUB_COLUMNS, "syncoco": _SYNCOCO_COLUMNS, "csv": _PAIR_COLUMNS}
    sources = _Sources(store, metadata)
    pairs: list[_Pair] = []
    first_line: dict[str, int] = {}
    for line, row in _read_table(path, required[kind], f"{kind} pair table"):
        if kind == "csv":
            pair_id, where = f"line {line}", f"{path}:{line}"
            images, old, new = (row["image_a"], row["image_b"]), row["old"], row["new"]
        else:
            pair_id = row["pair_id"]
            where = f"pair {pair_id!r} ({path}:{line})"
            if not pair_id:
                raise VisaeError(f"{path}:{line}: empty pair_id")
            if pair_id in first_line:
                raise VisaeError(f"{where}: pair_id repeats line {first_line[pair_id]}")
            first_line[pair_id] = line
            images = (row["orig_image"], row["syn_image"])
            if kind == "syncub":
                old, new = row["old_attr"], row["new_attr"]
            else:
                old, new = row["removed_class"], ""
        for image in images:
            if not image:
                raise VisaeError(f"{where}: empty image")
        a, b = (sources.find(image, where) for image in images)
        pairs.append(_Pair(pair_id, where, a, b, _spellings(kind, old), _spellings(kind, new)))
    if not pairs:
        raise VisaeError(f"{kind} pair table {path} has no rows")
    return pairs


def _spellings(kind: str, name: str) -> tuple[str, ...]:
    """The concept names a table's cell may stand for (empty: none)."""
    if not name:
        return ()
    if kind == "syncub" and not name.startswith("attr:"):
        return (name, f"attr:{name}")
    return (name,)


def load_pairs(
    spec: str,
    store: ActivationStore,
    concepts: ConceptLabels,
    dataset: ImageDataset | str | None = None,
) -> PairSet:
    """Image pairs of a pair source as store indices and concept columns of `concepts`
    (module docstring: specs and rules). `dataset` overrides the store's dataset for `scenes`."""
    if concepts.labels_NC.shape[0] != store.n_images:
        raise VisaeError(
            f"concept labels cover {concepts.labels_NC.shape[0]} images, store {store.path} "
            f"holds {store.n_images}"
        )
    chosen = spec.strip()
    kind, _, arg = chosen.partition(":")
    metadata = store.metadata()
    dropped: list[str] = []
    if chosen == "scenes":
        pairs, dropped = _scene_pairs(store, metadata, concepts, dataset)
    elif kind in ("syncub", "syncoco", "csv") and arg:
        path = Path(arg).expanduser()
        pairs = _table_pairs(kind, path, store, metadata)
        chosen = f"{kind}:{path.resolve()}"
    else:
        raise VisaeError(f"unknown pair source {spec!r}: expected one of {', '.join(PAIR_SPECS)}")
    scored = _Scored(concepts)
    kept: list[tuple[_Pair, int, int]] = []
    for p in pairs:
        if not p.old and not p.new:
            raise VisaeError(f"{p.where}: old and new concept are both none")
        if p.old == p.new:
            raise VisaeError(f"{p.where}: old and new concept are the same ({p.old[-1]!r})")
        if p.first == p.second:
            raise VisaeError(f"{p.where}: both images are store image {p.first}")
        old, new = _column(p, "old", p.old, scored), _column(p, "new", p.new, scored)
        if isinstance(old, str) or isinstance(new, str):
            dropped.append(old if isinstance(old, str) else str(new))
            continue
        if old == new:
            raise VisaeError(
                f"{p.where}: old and new concept are the same ({concepts.names[old]!r})"
            )
        kept.append((p, old, new))
    return PairSet(
        first_P=np.array([p.first for p, _, _ in kept], dtype=np.int64),
        second_P=np.array([p.second for p, _, _ in kept], dtype=np.int64),
        old_P=np.array([o for _, o, _ in kept], dtype=np.int64),
        new_P=np.array([n for _, _, n in kept], dtype=np.int64),
        pair_ids=tuple(p.pair_id for p, _, _ in kept),
        source=chosen,
        dropped=tuple(dropped),
    )
