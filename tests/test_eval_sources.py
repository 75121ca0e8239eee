"""Concept and pair sources of the evaluation suite: every spec on tiny stores written with the
store's writer, rows that follow `dataset_index` past skipped images, the half-coverage patch
rule on hand-built COCO masks, the model-view box against a per-pixel count, and the errors
that name the CSV line or the pair."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from visae.data import CocoDataset, SceneConfig, SceneDataset, Subset, generate_scenes
from visae.data.masks import encode_rle
from visae.errors import VisaeError
from visae.eval.sources import load_concepts, load_pairs
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter

LAYER = 3


def write_store(
    path: Path,
    metadata: Sequence[dict[str, Any]],
    *,
    dataset: dict[str, Any] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    preprocessing: dict[str, Any] | None = None,
    grid: tuple[int, int] = (2, 2),
) -> ActivationStore:
    """A store of zero activations whose images carry `metadata`."""
    layout = {"n_cls": 1, "n_registers": 0, "grid": list(grid)}
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "h", "preprocessing": preprocessing or {}},
        dataset=dataset or {"name": "toyset", "fingerprint": "fp"},
        layers=[LayerSpec(LAYER, 2, layout)],
        shard_images=max(1, len(metadata)),
    )
    acts = np.zeros((len(metadata), 1 + grid[0] * grid[1], 2), np.float32)
    with StoreWriter(path, spec) as w:
        w.append_shard({LAYER: acts}, list(metadata), skipped)
        w.finish()
    return ActivationStore.open(path)


def dataset_store(
    path: Path, ds: Any, skip: Sequence[int] = (), **kwargs: Any
) -> tuple[ActivationStore, list[int]]:
    """A store of `ds` as extraction writes it, with dataset images `skip` unreadable;
    returns it and the dataset index of each store image."""
    kept = [i for i in range(len(ds)) if i not in skip]
    store = write_store(
        path,
        [ds.metadata(i) | {"dataset_index": i} for i in kept],
        dataset={"name": ds.name, "fingerprint": ds.fingerprint, "spec": ds.spec},
        skipped=[{"index": i, "source": ds.metadata(i)["source"], "reason": "test"} for i in skip],
        **kwargs,
    )
    return store, kept


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> SceneDataset:
    folder = tmp_path_factory.mktemp("sources") / "scenes"
    config = SceneConfig(n_scenes=10, size=48, pairs_per_kind=2, objects="shapes", seed=0)
    return SceneDataset.load(generate_scenes(config, folder, workers=1, progress=False))


def pair_images(ds: SceneDataset) -> set[int]:
    return {i for p in ds.pairs for i in (p.image_a, p.image_b)}


# ---------------------------------------------------------------- scene concepts


def test_scene_concepts_follow_dataset_index_past_skipped_images(
    scenes: SceneDataset, tmp_path: Path
) -> None:
    skip = sorted(set(range(len(scenes))) - pair_images(scenes))[:2]
    store, kept = dataset_store(tmp_path / "store", scenes, skip)
    concepts = load_concepts(None, store)
    assert concepts.source == "scenes" and concepts.has_masks
    # hand: the dataset's rows of the images the store holds; a concept without a positive
    # there is excluded, the others kept in vocabulary order
    rows = np.array([[c in scenes.metadata(i)["labels"] for c in scenes.concepts] for i in kept])
    present = rows.any(axis=0)
    assert concepts.names == tuple(c for c, p in zip(scenes.concepts, present, strict=True) if p)
    assert concepts.excluded == tuple(
        c for c, p in zip(scenes.concepts, present, strict=True) if not p
    )
    np.testing.assert_array_equal(concepts.labels_NC, rows[:, present])
    assert concepts.labels_NC.dtype == bool
    # the first rows of the dataset are other images: the mapping matters
    assert not np.array_equal(concepts.labels_NC, scenes.concept_matrix()[: len(kept)][:, present])
    # min_positives: exactly the concepts with fewer positive store images go
    counts = rows.sum(axis=0)
    strict = load_concepts("scenes", store, min_positives=3)
    assert strict.names == tuple(c for c, n in zip(scenes.concepts, counts, strict=True) if n >= 3)
    assert strict.excluded == tuple(
        c for c, n in zip(scenes.concepts, counts, strict=True) if n < 3
    )
    assert strict.min_positives == 3


def test_scene_patch_labels_follow_the_crop_box_per_pixel(
    scenes: SceneDataset, tmp_path: Path
) -> None:
    # 48 px -> resize 64 -> center crop 48 x 56: the model sees x in [3, 45), y in [6, 42) of
    # the original, tiled by 3 x 4 patches of 10.5 x 12 px
    preprocessing = {"resize": {"shortest_edge": 64}, "center_crop": [48, 56]}
    store, kept = dataset_store(
        tmp_path / "store", scenes, [1], preprocessing=preprocessing, grid=(3, 4)
    )
    concepts = load_concepts("scenes", store)
    images = np.array([5, 0, 2])
    got = concepts.patch_labels(images, LAYER)
    assert got.shape == (3 * 12, len(concepts.names)) and got.dtype == bool

    def reference(box: tuple[int, int, int, int], grid: tuple[int, int]) -> np.ndarray:
        """Per pixel on a 2x finer grid: covered sub-pixels of each patch, at least half."""
        x0, y0, x1, y1 = (2 * v for v in box)
        rows, cols = grid
        ph, pw = (y1 - y0) // rows, (x1 - x0) // cols
        out = np.zeros((len(images) * rows * cols, len(concepts.names)), bool)
        for m, s in enumerate(images):
            for k, name in enumerate(concepts.names):
                fine = np.repeat(np.repeat(scenes.concept_mask(kept[s], name), 2, 0), 2, 1)
                for r in range(rows):
                    for c in range(cols):
                        top, left = y0 + r * ph, x0 + c * pw
                        covered = int(fine[top : top + ph, left : left + pw].sum())
                        out[m * rows * cols + r * cols + c, k] = 2 * covered >= ph * pw
        return out

    boxed = reference((3, 6, 45, 42), (3, 4))
    np.testing.assert_array_equal(got.toarray(), boxed)
    assert (boxed != reference((0, 0, 48, 48), (3, 4))).any()  # the box changes labels
    assert boxed.any()


def test_patch_labels_refuse_bad_images_and_layers(scenes: SceneDataset, tmp_path: Path) -> None:
    store, _ = dataset_store(tmp_path / "store", scenes)
    concepts = load_concepts("scenes", store)
    assert concepts.patch_labels(np.array([], dtype=np.int64), LAYER).shape == (
        0,
        len(concepts.names),
    )
    with pytest.raises(VisaeError, match=f"image {len(scenes)} is out of range"):
        concepts.patch_labels(np.array([len(scenes)]), LAYER)
    with pytest.raises(VisaeError, match="store indices"):
        concepts.patch_labels(np.array([0.5]), LAYER)
    with pytest.raises(VisaeError, match="layer 7 is not in the store"):
        concepts.patch_labels(np.array([0]), 7)


# ---------------------------------------------------------------- COCO concepts


def square(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((8, 8), bool)
    mask[rows, cols] = True
    return mask


def coco_dataset(tmp_path: Path) -> CocoDataset:
    """Three 8 x 8 images; `cat` (id 2) is never annotated. On a 2 x 2 grid (16 px patches)
    image 1 has: patch 0 person 8 px (half: on), patch 1 person 6 + 3 px overlapping by 2 (union
    7 px: off, though the annotations sum to 9), patch 2 dog 9 px (on), patch 3 person 4 px and
    dog 4 px (neither)."""
    anns = {
        1: [
            (1, square(slice(0, 2), slice(0, 4))),
            (1, square(slice(0, 2), slice(4, 7))),
            (1, square(slice(0, 1), slice(5, 8))),
            (3, square(slice(4, 7), slice(0, 3))),
            (1, square(slice(4, 5), slice(4, 8))),
            (3, square(slice(5, 6), slice(4, 8))),
        ],
        2: [(3, square(slice(0, 8), slice(0, 8)))],
        3: [(1, square(slice(4, 8), slice(4, 8)))],
    }
    data = {
        "images": [
            {"id": i, "file_name": f"im{i}.png", "width": 8, "height": 8} for i in (1, 2, 3)
        ],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "category_id": c, "segmentation": encode_rle(m)}
            for i, items in anns.items()
            for k, (c, m) in enumerate(items)
        ],
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 2, "name": "cat"},
            {"id": 3, "name": "dog"},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return CocoDataset(path)


def test_coco_concepts_and_the_half_coverage_rule(tmp_path: Path) -> None:
    coco = coco_dataset(tmp_path)
    store, kept = dataset_store(tmp_path / "store", coco, [1])
    assert kept == [0, 2]
    concepts = load_concepts("auto", store)
    assert concepts.source == "coco"
    assert concepts.names == ("person", "dog") and concepts.excluded == ("cat",)
    np.testing.assert_array_equal(concepts.labels_NC, [[1, 1], [1, 0]])
    got = concepts.patch_labels(np.array([1, 0]), LAYER).toarray()
    # store image 1 (COCO image 3): person fills patch 3; store image 0: as the docstring says
    expected = [[0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [0, 0], [0, 1], [0, 0]]
    np.testing.assert_array_equal(got, np.array(expected, bool))
    with pytest.raises(VisaeError, match="needs a SceneDataset"):
        load_concepts("scenes", store)


# ---------------------------------------------------------------- labels and CSV concepts

CUB_META = [
    {"source": "images/001.Albatross/a.jpg", "labels": ["class:001.Albatross", "attr:bill::hook"]},
    {"source": "images/001.Albatross/b.jpg", "labels": ["class:001.Albatross", "attr:wing::blue"]},
    {"source": "images/002.Auklet/c.jpg", "labels": ["class:002.Auklet", "attr:bill::hook"]},
    {"source": "syn/001.Albatross/a.png", "labels": ["class:001.Albatross", "attr:bill::cone"]},
]

SYN_META = [
    *CUB_META,
    {"source": "syn/002.Auklet/c.png", "labels": ["class:002.Auklet", "attr:wing::blue"]},
    {"source": "other/001.Albatross/a.jpg", "labels": ["class:001.Albatross"]},
]


def test_labels_specs_and_aliases(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store", CUB_META)
    every = load_concepts(None, store)  # the store records no dataset spec: labels
    assert every.source == "labels" and not every.has_masks
    assert every.names == (
        "attr:bill::cone",
        "attr:bill::hook",
        "attr:wing::blue",
        "class:001.Albatross",
        "class:002.Auklet",
    )
    np.testing.assert_array_equal(
        every.labels_NC.astype(int),
        [[0, 1, 0, 1, 0], [0, 0, 1, 1, 0], [0, 1, 0, 0, 1], [1, 0, 0, 1, 0]],
    )
    for alias in ("imagefolder", "hf", "labels"):
        assert load_concepts(alias, store).names == every.names
    cub = load_concepts("cub", store, min_positives=2)
    assert cub.source == "labels:attr:"
    assert cub.names == ("attr:bill::hook",)
    assert cub.excluded == ("attr:bill::cone", "attr:wing::blue")
    np.testing.assert_array_equal(cub.labels_NC[:, 0], [1, 0, 1, 0])
    classes = load_concepts("labels:class:", store)
    assert classes.names == ("class:001.Albatross", "class:002.Auklet")
    with pytest.raises(VisaeError, match="'labels:attr:' has no masks"):
        cub.patch_labels(np.array([0]), LAYER)
    with pytest.raises(VisaeError, match="starts with 'part:'"):
        load_concepts("labels:part:", store)
    with pytest.raises(VisaeError, match="none of its 5 concepts has 4 positive images"):
        load_concepts("labels", store, min_positives=4)
    with pytest.raises(VisaeError, match="min_positives must be a positive integer"):
        load_concepts("labels", store, min_positives=0)
    with pytest.raises(VisaeError, match=r"unknown concept source 'nope'.*labels:PREFIX.*csv:FILE"):
        load_concepts("nope", store)
    bare = write_store(tmp_path / "bare", [{"source": "x.png"}, {"source": "y.png"}])
    with pytest.raises(VisaeError, match="has no labels in its image metadata"):
        load_concepts("labels", bare)


def test_csv_concepts_by_index_source_and_suffix(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store", CUB_META)
    table = write_csv(
        tmp_path / "concepts.csv",
        ["image", "concept"],
        [
            [3, "striped"],
            ["images/001.Albatross/a.jpg", "striped"],  # exact source
            ["002.Auklet/c.jpg", "spotted"],  # a path suffix
            ["002.Auklet/c.jpg", "spotted"],  # repeated: counts once
            ["1", "plain"],
        ],
    )
    concepts = load_concepts(f"csv:{table}", store, min_positives=1)
    assert concepts.source == f"csv:{table.resolve()}"
    assert concepts.names == ("plain", "spotted", "striped") and concepts.excluded == ()
    np.testing.assert_array_equal(
        concepts.labels_NC.astype(int), [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    )
    assert load_concepts(f"csv:{table}", store, min_positives=2).excluded == ("plain", "spotted")

    cases = [
        ([["0", "a"], ["nowhere.jpg", "a"]], rf"{table.name}:3: image 'nowhere.jpg' is not in"),
        ([["0", "a"], ["0", "b"], ["4", "a"]], rf"{table.name}:4: image 4 is out of range"),
        ([["001.Albatross/a.jpg", ""]], rf"{table.name}:2: empty image or concept"),
    ]
    for rows, message in cases:
        write_csv(table, ["image", "concept"], rows)
        with pytest.raises(VisaeError, match=message):
            load_concepts(f"csv:{table}", store)
    # an exact source wins over a suffix of another; a suffix of two sources is ambiguous
    nested = write_store(tmp_path / "nested", [{"source": "x/a.jpg"}, {"source": "y/x/a.jpg"}])
    write_csv(table, ["image", "concept"], [["x/a.jpg", "c"]])
    np.testing.assert_array_equal(load_concepts(f"csv:{table}", nested).labels_NC, [[1], [0]])
    write_csv(table, ["image", "concept"], [["a.jpg", "c"]])
    with pytest.raises(VisaeError, match=r":2: image 'a.jpg' is ambiguous.*images 0 \(x/a.jpg\)"):
        load_concepts(f"csv:{table}", nested)
    write_csv(table, ["img", "concept"], [["0", "a"]])
    with pytest.raises(VisaeError, match="header lacks image"):
        load_concepts(f"csv:{table}", store)
    with pytest.raises(VisaeError, match="not found"):
        load_concepts(f"csv:{tmp_path / 'missing.csv'}", store)


# ---------------------------------------------------------------- scene pairs


def test_scene_pairs_map_images_and_take_the_most_specific_concept(
    scenes: SceneDataset, tmp_path: Path
) -> None:
    skip = sorted(set(range(len(scenes))) - pair_images(scenes))[:2]
    store, kept = dataset_store(tmp_path / "store", scenes, skip)
    concepts = load_concepts("scenes", store)
    pairs = load_pairs("scenes", store, concepts)
    assert pairs.source == "scenes" and pairs.dropped == ()
    assert pairs.pair_ids == tuple(str(p.pair) for p in scenes.pairs)
    store_of = {d: s for s, d in enumerate(kept)}
    np.testing.assert_array_equal(pairs.first_P, [store_of[p.image_a] for p in scenes.pairs])
    np.testing.assert_array_equal(pairs.second_P, [store_of[p.image_b] for p in scenes.pairs])
    assert any(
        a != b for a, b in zip(pairs.first_P, [p.image_a for p in scenes.pairs], strict=True)
    )
    # a pair's concepts come in vocabulary order, which lists parents before children: the
    # last one that is scored is the most specific
    names = list(concepts.names)
    assert any(len(p.old) > 1 for p in scenes.pairs)
    for p, old, new in zip(scenes.pairs, pairs.old_P, pairs.new_P, strict=True):
        assert names[old] == [c for c in p.old if c in names][-1]
        assert new == (names.index([c for c in p.new if c in names][-1]) if p.new else -1)
    assert {
        int(n) for p, n in zip(scenes.pairs, pairs.new_P, strict=True) if p.kind == "removal"
    } == {-1}
    # the same from the dataset object, and with concepts from the store's labels
    again = load_pairs("scenes", store, load_concepts("labels", store), scenes)
    np.testing.assert_array_equal(again.first_P, pairs.first_P)


def test_scene_pairs_outside_a_subset_drop_and_skipped_images_fail(
    scenes: SceneDataset, tmp_path: Path
) -> None:
    subset = Subset(scenes, range(12))  # the 10 scenes and the edits of the 2 removal pairs
    store, _ = dataset_store(tmp_path / "subset", subset)
    concepts = load_concepts("scenes", store)
    pairs = load_pairs("scenes", store, concepts)
    inside = [p for p in scenes.pairs if max(p.image_a, p.image_b) < 12]
    assert [p.kind for p in inside] == ["removal", "removal"]
    assert pairs.pair_ids == tuple(str(p.pair) for p in inside)
    assert len(pairs.dropped) == len(scenes.pairs) - 2
    assert pairs.dropped[0].startswith(f"pair {scenes.pairs[2].pair}: scene image ")
    assert "outside the dataset subset" in pairs.dropped[0]

    first = scenes.pairs[0]
    store, _ = dataset_store(tmp_path / "skipped", scenes, [first.image_b])
    with pytest.raises(VisaeError, match=f"pair {first.pair}: scene image {first.image_b} is not"):
        load_pairs("scenes", store, load_concepts("scenes", store))


# ---------------------------------------------------------------- table pairs

SYNCUB_HEADER = [
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
]


ALBATROSS_A, SYN_A = "images/001.Albatross/a.jpg", "syn/001.Albatross/a.png"
WING, BLUE = "wing::blue", "attr:wing::blue"


def syncub_row(pair: str, orig: str, syn: str, old: str, new: str) -> list[Any]:
    return [pair, orig, syn, 1, "Albatross", old, new, 3, 7, "[3, 9]", "[7, 9]"]


def test_syncub_pairs(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store", SYN_META)
    concepts = load_concepts("cub", store)
    table = write_csv(
        tmp_path / "metadata.csv",
        SYNCUB_HEADER,
        [
            # the attribute without its attr: prefix, images by exact source and by suffix
            syncub_row("p1", ALBATROSS_A, SYN_A, "bill::hook", "bill::cone"),
            syncub_row("p2", "002.Auklet/c.jpg", "002.Auklet/c.png", "attr:bill::hook", WING),
        ],
    )
    pairs = load_pairs(f"syncub:{table}", store, concepts)
    assert pairs.source == f"syncub:{table.resolve()}"
    assert pairs.pair_ids == ("p1", "p2")
    np.testing.assert_array_equal(pairs.first_P, [0, 2])
    np.testing.assert_array_equal(pairs.second_P, [3, 4])
    names = concepts.names
    np.testing.assert_array_equal(
        pairs.old_P, [names.index("attr:bill::hook"), names.index("attr:bill::hook")]
    )
    np.testing.assert_array_equal(
        pairs.new_P, [names.index("attr:bill::cone"), names.index("attr:wing::blue")]
    )
    assert pairs.old_P.dtype == np.int64 and pairs.first_P.dtype == np.int64

    # excluded for lack of positives: dropped with the reason; the rest kept
    strict = load_concepts("cub", store, min_positives=2)
    dropped = load_pairs(f"syncub:{table}", store, strict)
    assert dropped.pair_ids == ("p2",)
    assert len(dropped.dropped) == 1
    assert dropped.dropped[0].startswith("pair 'p1' (")
    assert "new concept 'attr:bill::cone' excluded" in dropped.dropped[0]
    assert "fewer than 2 positive images" in dropped.dropped[0]

    ok = syncub_row("p0", "images/001.Albatross/b.jpg", SYN_A, "wing::blue", "bill::cone")
    cases = [
        (
            syncub_row("p3", "001.Albatross/a.jpg", "syn/001.Albatross/a.png", "bill::hook", ""),
            r"pair 'p3' .*:3\): image '001.Albatross/a.jpg' is ambiguous.*images 0 .* and 5 ",
        ),
        (
            syncub_row("p4", "images/001.Albatross/zz.jpg", "syn/002.Auklet/c.png", "x", "y"),
            r"pair 'p4' .*: image 'images/001.Albatross/zz.jpg' is not in store",
        ),
        (
            syncub_row("p5", "002.Auklet/c.jpg", "002.Auklet/c.png", "bill::hook", "tail::long"),
            r"pair 'p5' .*: new concept \['tail::long', 'attr:tail::long'\] is unknown",
        ),
        (
            syncub_row("p6", "002.Auklet/c.jpg", "002.Auklet/c.png", "wing::blue", "wing::blue"),
            r"pair 'p6' .*: old and new concept are the same",
        ),
        (
            syncub_row("p7", "002.Auklet/c.jpg", "002.Auklet/c.png", WING, "attr:wing::blue"),
            r"pair 'p7' .*: old and new concept are the same \('attr:wing::blue'\)",
        ),
        (
            syncub_row("p0", "002.Auklet/c.jpg", "002.Auklet/c.png", "wing::blue", "bill::hook"),
            r"pair 'p0' .*:3\): pair_id repeats line 2",
        ),
    ]
    for row, message in cases:
        write_csv(table, SYNCUB_HEADER, [ok, row])
        with pytest.raises(VisaeError, match=message):
            load_pairs(f"syncub:{table}", store, concepts)
    write_csv(table, SYNCUB_HEADER[:6], [ok[:6]])
    with pytest.raises(VisaeError, match="header lacks new_attr"):
        load_pairs(f"syncub:{table}", store, concepts)


def test_syncoco_pairs_are_removal_only(tmp_path: Path) -> None:
    meta = [
        {"source": "val2017/000000000139.jpg", "labels": ["dog", "person"]},
        {"source": "syn/000000000139_no_dog.png", "labels": ["person"]},
        {"source": "val2017/000000000285.jpg", "labels": ["bear"]},
        {"source": "syn/000000000285_no_bear.png", "labels": []},
    ]
    store = write_store(tmp_path / "store", meta)
    concepts = load_concepts("labels", store)
    assert concepts.names == ("bear", "dog", "person")
    header = [
        "pair_id",
        "orig_image",
        "syn_image",
        "coco_idx",
        "removed_cls_idx",
        "removed_class",
        "orig_labels",
        "syn_labels",
    ]
    rows = [
        [7, "000000000139.jpg", "000000000139_no_dog.png", 139, 17, "dog", "[17, 0]", "[0]"],
        [
            9,
            "val2017/000000000285.jpg",
            "syn/000000000285_no_bear.png",
            285,
            22,
            "bear",
            "[22]",
            "",
        ],
    ]
    table = write_csv(tmp_path / "metadata.csv", header, rows)
    pairs = load_pairs(f"syncoco:{table}", store, concepts)
    assert pairs.pair_ids == ("7", "9")
    np.testing.assert_array_equal(pairs.first_P, [0, 2])
    np.testing.assert_array_equal(pairs.second_P, [1, 3])
    np.testing.assert_array_equal(pairs.old_P, [1, 0])
    np.testing.assert_array_equal(pairs.new_P, [-1, -1])
    write_csv(table, header, [[*rows[0][:5], "giraffe", "[]", "[]"]])
    with pytest.raises(VisaeError, match=r"pair '7' .*: old concept 'giraffe' is unknown"):
        load_pairs(f"syncoco:{table}", store, concepts)


def test_generic_csv_pairs(tmp_path: Path) -> None:
    store = write_store(tmp_path / "store", SYN_META)
    concepts = load_concepts("cub", store, min_positives=2)  # bill::cone is excluded
    header = ["image_a", "image_b", "old", "new"]
    table = write_csv(
        tmp_path / "pairs.csv",
        header,
        [
            ["images/002.Auklet/c.jpg", "syn/002.Auklet/c.png", "attr:bill::hook", BLUE],
            ["002.Auklet/c.png", "002.Auklet/c.jpg", "attr:wing::blue", ""],  # removal
            ["syn/001.Albatross/a.png", "001.Albatross/b.jpg", "", "attr:wing::blue"],  # add
            ["001.Albatross/b.jpg", "syn/001.Albatross/a.png", "attr:bill::cone", ""],
        ],
    )
    pairs = load_pairs(f"csv:{table}", store, concepts)
    hook, blue = concepts.names.index("attr:bill::hook"), concepts.names.index("attr:wing::blue")
    assert pairs.pair_ids == ("line 2", "line 3", "line 4")
    np.testing.assert_array_equal(pairs.first_P, [2, 4, 3])
    np.testing.assert_array_equal(pairs.second_P, [4, 2, 1])
    np.testing.assert_array_equal(pairs.old_P, [hook, blue, -1])
    np.testing.assert_array_equal(pairs.new_P, [blue, -1, blue])
    assert pairs.dropped == (
        f"{table}:5: old concept 'attr:bill::cone' excluded by concept source 'labels:attr:' "
        "(fewer than 2 positive images in the store)",
    )
    assert len(pairs) == 3

    ok = ["images/002.Auklet/c.jpg", "syn/002.Auklet/c.png", "attr:bill::hook", ""]
    a, b = "images/002.Auklet/c.jpg", "syn/002.Auklet/c.png"
    cases = [
        ([a, b, "", ""], rf"{table.name}:3: old and new concept are both none"),
        ([a, b, "attr:wing::blue", "attr:wing::blue"], rf"{table.name}:3: old and new .* same"),
        ([a, a, "attr:wing::blue", ""], rf"{table.name}:3: both images are store image 2"),
        ([a, b, "wing::blue", ""], rf"{table.name}:3: old concept 'wing::blue' is unknown"),
        ([a, "syn/nothing.png", "attr:wing::blue", ""], rf"{table.name}:3: image 'syn/nothing"),
        ([a, b, "attr:wing::blue", "", "extra"], rf"{table.name}:3: more fields than the header"),
    ]
    for row, message in cases:
        write_csv(table, header, [ok, row])
        with pytest.raises(VisaeError, match=message):
            load_pairs(f"csv:{table}", store, concepts)
    write_csv(table, header, [])
    with pytest.raises(VisaeError, match="has no rows"):
        load_pairs(f"csv:{table}", store, concepts)
    with pytest.raises(VisaeError, match=r"unknown pair source 'tsv:x'.*syncub:FILE.*csv:FILE"):
        load_pairs("tsv:x", store, concepts)
    other = write_store(tmp_path / "other", SYN_META[:3])
    with pytest.raises(VisaeError, match=r"concept labels cover 6 images, store .* holds 3"):
        load_pairs(f"csv:{table}", other, concepts)
