"""Hierarchy (LCA depth, consistency, Matryoshka groups), taxonomy sources (scenes, folders,
JSON) and the interpretability proxies (locality, coarse/fine alignment): plain-Python
references on random data with ties and missing paths, planted latents, the exclusions, hand
computations and input errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import visae.eval.hierarchy as hierarchy
from visae.data import SceneConfig, SceneDataset, generate_scenes
from visae.errors import VisaeError
from visae.eval.bootstrap import bootstrap_ci
from visae.eval.hierarchy import (
    ImagePaths,
    consistency,
    group_means,
    lca_depth,
    matryoshka_boundaries,
    paths_from_json,
    paths_from_scenes,
    paths_from_sources,
)
from visae.eval.proxies import coarse_fine, locality, locality_maps
from visae.sae.config import SAEConfig

# ---------------------------------------------------------------- references


def excluded_reference(images: list[int], values: list[float]) -> bool:
    return any(i < 0 for i in images) or min(values) <= 0


def pair_mean_reference(top_LK, top_values_LK, paths, score) -> np.ndarray:
    """Per latent, the mean of score(path_a, path_b) over pairs of known paths, a loop."""
    out = []
    for images, values in zip(top_LK.tolist(), top_values_LK.tolist(), strict=True):
        if excluded_reference(images, values):
            out.append(math.nan)
            continue
        scores = [
            score(paths[a], paths[b])
            for a, b in itertools.combinations(images, 2)
            if paths[a] is not None and paths[b] is not None
        ]
        out.append(sum(scores) / len(scores) if scores else math.nan)
    return np.array(out)


def common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def random_case(seed: int, n_images: int = 40, n_latents: int = 300, k: int = 6):
    """Paths of 1-4 levels from a small alphabet (shared prefixes, repeated leaves, a fifth
    unknown), top lists with -1 slots, values from a few levels with ties and zeros."""
    rng = np.random.default_rng(seed)
    paths: list[tuple[str, ...] | None] = []
    for _ in range(n_images):
        if rng.random() < 0.2:
            paths.append(None)
        else:
            depth = int(rng.integers(1, 5))
            paths.append(tuple(str(rng.choice(["a", "b", "c"])) for _ in range(depth)))
    top = np.stack([rng.choice(n_images, k, replace=False) for _ in range(n_latents)])
    top[rng.random((n_latents, k)) < 0.03] = -1
    values = -np.sort(-rng.choice([0.0, 0.5, 1.0, 2.0], size=(n_latents, k)), axis=1)
    values[rng.random(n_latents) < 0.5, -1] = 1.0  # half keep a positive K-th value
    values = -np.sort(-values, axis=1)
    return ImagePaths(tuple(paths), "random"), top, values


# ---------------------------------------------------------------- LCA depth and consistency


def test_lca_depth_hand_computation() -> None:
    paths = ImagePaths((("a", "b", "c"), ("a", "b", "d"), ("a", "e"), None, ("f",)), "hand")
    top = np.array([[0, 1, 2, 3], [0, 1, 2, 4], [3, 0, 1, 2], [0, 3, 1, 2]])
    values = np.array([[3, 2, 2, 1], [3, 2, 2, 1], [3, 2, 2, 0], [5, 4, 3, 2.0]])
    # latent 0: pairs (0,1)=2, (0,2)=1, (1,2)=1; pairs with image 3 skipped -> 4/3
    # latent 1: + (0,4)=(1,4)=(2,4)=0 -> 4/6; latent 2: 4th value 0 -> excluded
    np.testing.assert_array_equal(lca_depth(top, values, paths), [4 / 3, 4 / 6, math.nan, 4 / 3])
    # depth 1: every pair among 0, 1, 2 agrees; depth 2: only (0, 1); full: none
    np.testing.assert_array_equal(consistency(top, values, paths, 1), [1, 0.5, math.nan, 1])
    np.testing.assert_array_equal(
        consistency(top, values, paths, 2), [1 / 3, 1 / 6, math.nan, 1 / 3]
    )
    np.testing.assert_array_equal(consistency(top, values, paths, None), [0, 0, math.nan, 0])


def test_shorter_path_is_compared_whole() -> None:
    paths = ImagePaths((("a", "b"), ("a", "b", "c"), ("a", "b")), "hand")
    values = np.ones((1, 3))
    # pairs: (0,1) agree on 2 levels, not on 3; (0,2) identical; (1,2) as (0,1)
    top = np.array([[0, 1, 2]])
    np.testing.assert_array_equal(consistency(top, values, paths, 2), [1.0])
    np.testing.assert_array_equal(consistency(top, values, paths, 3), [1 / 3])
    np.testing.assert_array_equal(consistency(top, values, paths, None), [1 / 3])
    np.testing.assert_array_equal(lca_depth(top, values, paths), [2.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_statistics_equal_the_reference(seed: int, monkeypatch) -> None:
    paths, top, values = random_case(seed)
    expected = pair_mean_reference(top, values, paths.paths, common_prefix)
    assert np.isnan(expected).any() and (~np.isnan(expected)).sum() > 50
    np.testing.assert_array_equal(lca_depth(top, values, paths), expected)
    for depth in (1, 2, 3, None):
        expected_c = pair_mean_reference(
            top, values, paths.paths, lambda a, b, d=depth: float(a[:d] == b[:d])
        )
        np.testing.assert_array_equal(consistency(top, values, paths, depth), expected_c)
    # many small blocks of latents give the same numbers
    monkeypatch.setattr(hierarchy, "_BLOCK", 15 * 4 * 7)
    np.testing.assert_array_equal(lca_depth(top, values, paths), expected)


def test_planted_latents() -> None:
    rng = np.random.default_rng(0)
    leaves = list(itertools.product("abcd", "efgh", "ijkl"))
    paths = ImagePaths(tuple(leaf for leaf in leaves for _ in range(16)), "planted")
    by_leaf = np.arange(len(paths)).reshape(len(leaves), 16)
    shared_leaf = by_leaf[rng.choice(len(leaves), 20)]  # 20 latents, each one leaf's 16 images
    # latents 20, 21: one image from each of the 16 leaves under one top-level name
    same_top = np.stack([rng.permutation(by_leaf[16 * b : 16 * b + 16, 0]) for b in (0, 1)])
    random_top = np.stack([rng.choice(len(paths), 16, replace=False) for _ in range(40)])
    top = np.concatenate([shared_leaf, same_top, random_top])
    values = np.tile(np.linspace(2.0, 1.0, 16), (len(top), 1))
    depth = lca_depth(top, values, paths)
    np.testing.assert_array_equal(depth[:20], 3.0)
    # 16 leaves under one name: 4 x 6 pairs share 2 levels, the other 96 one -> 144 / 120
    np.testing.assert_array_equal(depth[20:22], 1.2)
    # random pairs: expected depth 1/4 + 1/16 + 1/64 (about 0.33)
    assert 0.2 < depth[22:].mean() < 0.5
    coarse, fine = coarse_fine(top, values, paths)
    np.testing.assert_array_equal(coarse[:22], 1.0)
    np.testing.assert_array_equal(fine[:20], 1.0)
    np.testing.assert_array_equal(fine[20:22], 0.0)
    assert coarse[22:].mean() < 0.4 and fine[22:].mean() < 0.1
    groups = group_means(depth, [20, 22, 62])
    assert [g["mean"] for g in groups[:2]] == [3.0, 1.2]
    assert groups[2]["mean"] == pytest.approx(depth[22:].mean())


def test_kth_value_zero_and_short_lists_are_excluded() -> None:
    paths = ImagePaths(tuple(("x", "y") for _ in range(20)), "one leaf")
    top = np.tile(np.arange(16), (4, 1))
    values = np.tile(np.linspace(1.0, 0.1, 16), (4, 1))
    values[1, 15] = 0.0  # the 16th image has activation 0
    values[2, 15] = 1e-9  # tiny but positive: kept
    top[3, 15] = -1  # only 15 top images
    np.testing.assert_array_equal(lca_depth(top, values, paths), [2, math.nan, 2, math.nan])
    np.testing.assert_array_equal(consistency(top, values, paths, 1), [1, math.nan, 1, math.nan])
    # a latent whose pairs all lack a path is undefined, one with a single known pair is not
    gaps = ImagePaths((("x",), ("x",), *([None] * 18)), "gaps")
    assert np.isnan(lca_depth(top[:, ::-1][:, :8].copy(), values[:, :8], gaps)).all()
    np.testing.assert_array_equal(lca_depth(top[:1, :4], values[:1, :4], gaps), [1.0])
    groups = group_means(lca_depth(top, values, paths), [2, 4])
    assert [(g["n_latents"], g["n"], g["mean"]) for g in groups] == [
        (2, 1, 2.0),
        (2, 1, 2.0),
    ]
    assert groups[0]["ci"] is None


def test_pair_statistics_refuse_bad_input() -> None:
    paths = ImagePaths((("a",), ("b",), ("c",)), "hand")
    ok = np.array([[0, 1, 2]])
    cases = [
        (np.array([[0, 1, 3]]), np.ones((1, 3)), "latent 0 lists image 3 outside"),
        (np.array([[0, 1, -2]]), np.ones((1, 3)), "lists image -2"),
        (np.array([[0, 1, 1]]), np.ones((1, 3)), "lists image 1 twice"),
        (ok, np.ones((1, 2)), "differ in shape"),
        (ok[:, :1], np.ones((1, 1)), "K >= 2"),
        (ok.astype(float), np.ones((1, 3)), "integer store indices"),
        (ok, np.array([[1, np.nan, 1]]), "latent 0 hold NaN"),
    ]
    for top, values, message in cases:
        with pytest.raises(VisaeError, match=message):
            lca_depth(top, values, paths)
    for depth in (0, -1, 1.5, True):
        with pytest.raises(VisaeError, match="depth must be a positive integer"):
            consistency(ok, np.ones((1, 3)), paths, depth)
    with pytest.raises(VisaeError, match="not a string"):
        ImagePaths(("a/b",), "bad")
    with pytest.raises(VisaeError, match="image 1: path"):
        ImagePaths((("a",), ("a", "")), "bad")


# ---------------------------------------------------------------- groups


def test_matryoshka_boundaries_follow_the_sae() -> None:
    fractions = (1 / 16, 1 / 8, 1 / 4, 9 / 16, 1)
    assert matryoshka_boundaries(6144, fractions) == [384, 768, 1536, 3456, 6144]
    cfg = SAEConfig(arch="topk", n_latents=1000, matryoshka=(0.002, 0.011, 0.046, 0.235, 1.0))
    assert matryoshka_boundaries(1000, cfg.matryoshka) == list(cfg.matryoshka_sizes())
    with pytest.raises(VisaeError, match="must end with 1"):
        matryoshka_boundaries(100, (0.5, 0.9))
    with pytest.raises(VisaeError, match="strictly increasing"):
        matryoshka_boundaries(100, (0.5, 0.2, 1))


def test_group_means_equal_the_bootstrap() -> None:
    values = np.array([1.0, 2.0, np.nan, 4.0, np.nan, np.nan, 7.0, 8.0, 9.0, 10.0])
    groups = group_means(values, [3, 6, 10])
    mean, lo, hi = bootstrap_ci([1.0, 2.0])
    assert groups[0] == {
        "start": 0,
        "stop": 3,
        "n_latents": 3,
        "n": 2,
        "mean": 1.5,
        "ci": [lo, hi],
    }
    assert mean == 1.5 and lo < hi
    assert (groups[1]["n"], groups[1]["mean"], groups[1]["ci"]) == (1, 4.0, None)
    assert groups[2]["mean"] == 8.5 and (groups[2]["start"], groups[2]["stop"]) == (6, 10)
    assert group_means(np.full(2, np.nan), [2])[0]["mean"] is None
    for bounds in ([3, 6], [0, 10], [6, 3, 10], [], [3, 3, 10]):
        with pytest.raises(VisaeError, match="group boundaries"):
            group_means(values, bounds)


# ---------------------------------------------------------------- sources


def test_paths_from_sources() -> None:
    got = paths_from_sources(["animals/mammals/dog/x.jpg", "top.png", "cat/./y.jpg"])
    assert got.paths == (("animals", "mammals", "dog"), None, ("cat",))
    assert (got.n_known, got.max_depth, len(got)) == (2, 3, 3)
    for bad in ("/abs/a.jpg", "../up/a.jpg", ""):
        with pytest.raises(VisaeError, match="store image 0: source"):
            paths_from_sources([bad])


SOURCES = ["dog/a.jpg", "dog/b.jpg", "cat/c.jpg", "d.jpg", "twin.jpg", "twin.jpg"]


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_paths_from_json_forms(tmp_path: Path) -> None:
    mapping = {"dog/a.jpg": "animals/dogs/a", "1": ["animals", "dogs"], "2": "animals"}
    got = paths_from_json(write(tmp_path, mapping), SOURCES)
    assert got.paths == (("animals", "dogs", "a"), ("animals", "dogs"), ("animals",)) + (None,) * 3
    assert got.source == f"json:{tmp_path / 'taxonomy.json'}"
    tree = {"animals": {"dogs": ["dog/a.jpg", 1], "cats": {"small": ["2"]}}, "things": ["d.jpg"]}
    got = paths_from_json(write(tmp_path, tree), SOURCES)
    assert got.paths[:4] == (
        ("animals", "dogs"),
        ("animals", "dogs"),
        ("animals", "cats", "small"),
        ("things",),
    )
    assert got.paths[4:] == (None, None)
    # values all lists: a mapping when every key is an image, a one-level tree otherwise
    got = paths_from_json(write(tmp_path, {"dogs": ["0", "1"], "cats": ["cat/c.jpg"]}), SOURCES)
    assert got.paths[:3] == (("dogs",), ("dogs",), ("cats",))
    got = paths_from_json(write(tmp_path, {"0": ["dogs", "small"], "3": ["x"]}), SOURCES)
    assert got.paths[0] == ("dogs", "small") and got.paths[3] == ("x",)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dog/z.jpg": "a/b"}, "image 'dog/z.jpg' is not in the store"),
        ({"6": "a/b"}, r"image '6' is not in the store \(neither a metadata source nor a store"),
        ({"a": {"b": ["dog/a.jpg", "nope.jpg"]}}, "image 'nope.jpg' is not in the store"),
        ({"a": {"b": ["dog/a.jpg"], "c": 3}}, "node 'a/c' must be an object of nodes or a list"),
        ({"a": {"b": "dog/a.jpg"}}, "node 'a/b' must be .* not a string"),
        ({"a": {"b": [None]}}, "node 'a/b' lists None"),
        ({"a": {"b/c": []}}, "node 'a' has a child named 'b/c'"),
        ({"a": {"": []}}, "node 'a' has a child named ''"),
        ({"a": {"b": ["0"]}, "c": ["dog/a.jpg"]}, "store image 0 is listed twice"),
        ({"0": "a/b", "dog/a.jpg": "a"}, "store image 0 is listed twice"),
        ({"0": "a//b"}, "the path of image '0' must be"),
        ({"0": []}, "the path of image '0' must be"),
        ({"0": ["a", 3]}, "the path of image '0' must be"),
        ({"0": 7}, "the path of image '0' must be"),
        ({"twin.jpg": "a"}, "source 'twin.jpg' names several store images"),
        ({"dogs": ["0"], "cats": ["zzz"]}, "key 'dogs' is not a store image.*item 'zzz'"),
        ({}, "gives no image a path"),
        ([1, 2], "must hold a JSON object, not a list"),
    ],
)
def test_paths_from_json_errors(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(VisaeError, match=message):
        paths_from_json(write(tmp_path, data), SOURCES)


def test_paths_from_json_unreadable(tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="cannot read taxonomy file"):
        paths_from_json(tmp_path / "missing.json", SOURCES)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(VisaeError, match=r"bad\.json is not valid JSON"):
        paths_from_json(tmp_path / "bad.json", SOURCES)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> SceneDataset:
    config = SceneConfig(n_scenes=12, size=64, pairs_per_kind=0, objects="shapes")
    folder = generate_scenes(config, tmp_path_factory.mktemp("scenes") / "s", progress=False)
    return SceneDataset.load(folder)


def test_paths_from_scenes_take_the_largest_visible_object(scenes: SceneDataset) -> None:
    index = [11, 3, 0, 7, 5]
    got = paths_from_scenes(scenes, index)
    assert any(len(scenes.records[i]["objects"]) > 1 for i in index)
    for n, path in zip(index, got.paths, strict=True):
        objects = scenes.records[n]["objects"]
        # the area is the object's visible pixels in the label map
        masks = scenes.instance_masks(n)
        assert [o["area"] for o in objects] == masks.sum(axis=(1, 2)).tolist()
        best = max(range(len(objects)), key=lambda j: (objects[j]["area"], -j))
        assert path == tuple(objects[best]["item"].split("/"))
        assert path[:-1] == tuple(objects[best]["category"].split("/"))
    assert got.source.startswith("scenes:") and got.max_depth == 4


def test_paths_from_scenes_ties_and_errors(scenes: SceneDataset) -> None:
    n = next(i for i, r in enumerate(scenes.records) if len(r["objects"]) > 1)
    record = scenes.records[n]
    tied = {**record, "objects": [{**o, "area": 50} for o in record["objects"]]}
    original = scenes.records[n]
    scenes.records[n] = tied
    try:
        assert paths_from_scenes(scenes, [n]).paths[0] == tuple(
            record["objects"][0]["item"].split("/")
        )
    finally:
        scenes.records[n] = original
    with pytest.raises(VisaeError, match="store image 1: dataset index 12 is not a scene"):
        paths_from_scenes(scenes, [0, 12])


# ---------------------------------------------------------------- locality


def locality_reference(maps: np.ndarray) -> float:
    """1 - (PR - 1) / (P - 1) of one map, in plain Python."""
    total = sum(float(a) for a in maps)
    squares = sum(float(a) * float(a) for a in maps)
    pr = total * total / squares
    return 1 - (pr - 1) / (len(maps) - 1)


def test_locality_maps_extremes_and_hand_values() -> None:
    maps = [[0, 0, 5, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [3, 1, 0, 0]]
    # [1, 1, 0, 0]: PR 2 -> 1 - 1/3; [3, 1, 0, 0]: PR 16/10 -> 1 - 0.6/3
    np.testing.assert_allclose(locality_maps(maps), [1, 0, math.nan, 2 / 3, 0.8], rtol=1e-15)
    with pytest.raises(VisaeError, match="n_patches=1: locality needs"):
        locality_maps([[1.0], [2.0]])
    with pytest.raises(VisaeError, match="activation map 1 has negative values"):
        locality_maps([[1, 0], [0, -1]])
    with pytest.raises(VisaeError, match=r"\[maps, patches\]"):
        locality_maps([1, 2, 3])


def test_locality_equals_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    n, n_latents, p, k = 30, 25, 9, 5
    maps_NLP = rng.exponential(size=(n, n_latents, p)) * (rng.random((n, n_latents, p)) < 0.3)
    maps_NLP[:, 3] = 0.0  # a latent that never fires
    maps_NLP[:, 4] = 0.0
    maps_NLP[:5, 4, 2] = 1.0  # single-patch maps: locality 1
    maps_NLP[:, 5] = 0.5  # uniform maps, equal maxima (ties to the lower image): locality 0
    img_max_NL = maps_NLP.max(axis=2)
    top_LK = np.argsort(-img_max_NL.T, axis=1, kind="stable")[:, :k]
    top_LK[7, 3:] = -1  # empty slots
    sum_NL, sumsq_NL = maps_NLP.sum(axis=2), (maps_NLP**2).sum(axis=2)
    expected = []
    for j in range(n_latents):
        per_image = [
            locality_reference(maps_NLP[i, j])
            for i in top_LK[j]
            if i >= 0 and maps_NLP[i, j].sum() > 0
        ]
        expected.append(sum(per_image) / len(per_image) if per_image else math.nan)
    expected = np.array(expected)
    assert np.isnan(expected[3]) and expected[4] == 1.0 and expected[5] == pytest.approx(0)
    for s, q in ((sum_NL, sumsq_NL), (sp.csr_matrix(sum_NL), sp.csr_array(sumsq_NL))):
        got = locality(s, q, p, top_LK)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    # the dense form on the same maps
    np.testing.assert_allclose(
        locality_maps(maps_NLP[top_LK[0], 0]),
        [locality_reference(maps_NLP[i, 0]) for i in top_LK[0]],
        rtol=1e-12,
    )


def test_locality_sparse_with_duplicates_and_missing_entries() -> None:
    # image 0: latent 0 stored twice (summed: 2, 2), latent 1 absent (no activation)
    s = sp.csr_array((np.array([1.0, 1.0, 4.0]), ([0, 0, 1], [0, 0, 1])), shape=(2, 2))
    q = sp.csr_array((np.array([1.0, 1.0, 16.0]), ([0, 0, 1], [0, 0, 1])), shape=(2, 2))
    # latent 0 on image 0: sum 2, sum sq 2, PR 2 of 4 patches -> 2/3; image 1 has no entry
    top = np.array([[0, 1], [1, 0]])
    np.testing.assert_allclose(locality(s, q, 4, top), [2 / 3, 1.0])


def test_locality_refuses_bad_input() -> None:
    s, q, top = np.ones((3, 2)), np.ones((3, 2)), np.array([[0, 1], [2, -1]])
    with pytest.raises(VisaeError, match="n_patches=1: locality needs"):
        locality(s, q, 1, top)
    with pytest.raises(VisaeError, match="same shape"):
        locality(s, q[:2], 4, top)
    with pytest.raises(VisaeError, match="latents=2"):
        locality(s, q, 4, top[:1])
    with pytest.raises(VisaeError, match="latent 1 lists image 3"):
        locality(s, q, 4, np.array([[0, 1], [3, -1]]))
    with pytest.raises(VisaeError, match=r"image 1, latent 0: sum 1\.0 and sum of squares 2\.0"):
        locality(s, np.array([[1, 1], [2, 1], [1, 1.0]]), 4, top)  # PR 1/2 < 1
    with pytest.raises(VisaeError, match=r"image 2, latent 1: sum 4\.0"):
        locality(np.array([[1, 1], [1, 1], [1, 4.0]]), q, 4, np.array([[0, 1], [2, 2]]))
    with pytest.raises(VisaeError, match=r"patch sum of image 0, latent 0 is -1\.0"):
        locality(-s, q, 4, top)
