"""`visae.eval.evaluate` end to end on planted ground truth: concept scenes whose activations
are exactly a known dictionary of concept atoms, and an SAE that is that dictionary. Matching
must recover the planted latents, TAPAScore must be near its maximum, and the untrained and
random baselines near chance; the image-level code pass must equal a dense reference."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from visae.data import SceneConfig, SceneDataset, generate_scenes
from visae.errors import VisaeError
from visae.eval.codes import RandomCodes, SAECodes, image_codes
from visae.eval.evaluate import EvalConfig, Evaluation, evaluate
from visae.sae import SAE, SAEConfig
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter

LAYER = 4
GRID = (8, 8)
SIZE = 64
PREPROCESSING = {
    "resize": {"height": SIZE, "width": SIZE},
    "resample": "bilinear",
    "rescale_factor": 1 / 255,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "output_size": [SIZE, SIZE],
    "source": "test",
}
THRESHOLD = 0.05  # planted latents fire above this activation (noise stays below it)
NUISANCE = 1.0


@dataclass
class Planted:
    scenes: SceneDataset
    store: ActivationStore
    sae_dir: Path
    atoms: np.ndarray  # [C, d]: concept c's direction = planted latent c


def _planted(root: Path, cls_only: bool = False) -> Planted:
    folder = generate_scenes(
        SceneConfig(
            n_scenes=160, size=SIZE, seed=3, objects="shapes", max_objects=2, pairs_per_kind=10
        ),
        root / "scenes",
        progress=False,
        workers=1,
    )
    scenes = SceneDataset.load(folder)
    n_concepts = len(scenes.concepts)
    d = 256  # room for an untrained SAE's random directions to be unrelated to the atoms
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0].T.astype(np.float32)
    atoms, nuisance = basis[:n_concepts], basis[n_concepts:]
    n = len(scenes)
    n_patches = GRID[0] * GRID[1]
    acts = np.empty((n, 1 + n_patches, d), np.float32)
    for i in range(n):
        # a concept's atom on the patches it labels (at least half covered), as the suite reads them
        labelled = scenes.patch_labels(i, GRID) >= 0.5
        acts[i, 1:] = 2 * labelled.astype(np.float32) @ atoms
        acts[i, 0] = 2 * scenes.concept_matrix()[i].astype(np.float32) @ atoms
    # variation the concepts do not explain, orthogonal to every atom and larger than them: an
    # untrained SAE's random directions read mostly this, the planted latents none of it
    acts += (
        NUISANCE
        * rng.standard_normal((*acts.shape[:2], len(nuisance))).astype(np.float32)
        @ nuisance
    )
    spec = StoreSpec(
        backbone={"name": "planted", "weights_hash": "planted-1", "preprocessing": PREPROCESSING},
        dataset={"name": scenes.name, "fingerprint": scenes.fingerprint, "spec": scenes.spec},
        layers=[LayerSpec(LAYER, d, {"n_cls": 1, "n_registers": 0, "grid": list(GRID)})],
        dtype="float32",
        shard_images=64,
    )
    meta = [{**scenes.metadata(i), "dataset_index": i} for i in range(n)]
    with StoreWriter(root / "store", spec) as w:
        for lo in range(0, n, 64):
            w.append_shard({LAYER: acts[lo : lo + 64]}, meta[lo : lo + 64])
        w.finish()
    store = ActivationStore.open(root / "store")
    n_latents = n_concepts + 200
    sae = SAE.create(SAEConfig(arch="topk", d=d, n_latents=n_latents, k=12, seed=0))
    with torch.no_grad():
        w_enc = np.zeros((n_latents, d), np.float32)
        w_enc[:n_concepts] = atoms
        sae.W_enc.copy_(torch.from_numpy(w_enc))
        sae.W_dec.copy_(torch.from_numpy(w_enc))
        sae.b_enc.fill_(-2 * THRESHOLD)
        sae.b_enc[n_concepts:] = -1e3  # the spare latents never fire: dead
        sae.b_dec.zero_()
    sae.set_normalization(torch.zeros(d), 1.0)
    tokens = "cls" if cls_only else "patch"
    sae_dir = sae.save(root / "sae", store=store.identity(), layer=LAYER, tokens=tokens)
    return Planted(scenes, store, sae_dir, atoms)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return _planted(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def evaluation(planted: Planted, tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    config = EvalConfig(image_rule="any", encoder="none", n_resamples=300, min_positives=3)
    return evaluate(
        planted.sae_dir,
        planted.store,
        tmp_path_factory.mktemp("eval") / "out",
        config,
        progress=False,
    )


def _row(ev: Evaluation, name: str) -> dict:
    return next(r for r in ev.scores["scores"] if r["name"] == name)


def test_matching_recovers_the_planted_latents(planted: Planted, evaluation: Evaluation) -> None:
    for name in ("best_single_f1", "match@3"):
        row = _row(evaluation, name)
        assert row["values"]["trained"]["value"] > 0.95, name
        assert row["values"]["frozen"]["value"] < row["values"]["trained"]["value"] - 0.2
        assert row["separates"] == {"frozen": True, "random": True}
    patch = _row(evaluation, "best_single_f1_patch")["values"]
    assert patch["trained"]["value"] > 0.8
    assert patch["random"]["value"] < 0.5
    with open(evaluation.path / "latents_trained.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    names = planted.scenes.concepts
    scored = {r["concept"] for r in table if r["concept"]}
    right = [r["concept"] == names[int(r["latent"])] for r in table if r["concept"]]
    assert len(scored) > 0.8 * len(names) and np.mean(right) > 0.9
    spare = [r for r in table if int(r["latent"]) >= len(names)]
    assert all(r["frequency"] == "0" and r["concept"] == "" for r in spare)


def test_tapa_near_maximum_and_baselines_near_zero(evaluation: Evaluation) -> None:
    for name, top in (("tapa", 2.0), ("tapa_removal", 1.0)):
        row = _row(evaluation, name)
        assert row["values"]["trained"]["value"] > 0.85 * top, name
        for baseline in ("frozen", "random"):
            assert abs(row["values"][baseline]["value"]) < 0.25 * top, (name, baseline)
        assert row["separates"]["frozen"] is True
    per_concept = evaluation.scores["tapa_per_concept"]
    assert per_concept and all("trained" in c["swap_add"] for c in per_concept)


def test_scores_json_is_complete_and_report_written(evaluation: Evaluation) -> None:
    s = evaluation.scores
    assert s["schema"] == "visae.evaluation/1"
    assert s["settings"]["variants"] == ["trained", "frozen", "random"]
    assert s["inputs"]["concepts"]["source"].startswith("scenes")
    assert s["inputs"]["pairs"]["n_pairs"] > 0
    assert len(s["curves"]["match_at_k"]["image"]["k"]) == 20
    for row in s["scores"]:
        for v in row["values"].values():
            assert v["value"] is None or np.isfinite(v["value"])
    assert (evaluation.path / "report.html").is_file()
    assert "delta_match@3" in {r["name"] for r in s["scores"]}
    text = evaluation.summary()
    assert "match@3" in text and "above frozen" in text


def test_cached_rerun_gives_the_same_scores(planted: Planted, evaluation: Evaluation) -> None:
    config = EvalConfig(image_rule="any", encoder="none", n_resamples=300, min_positives=3)
    again = evaluate(planted.sae_dir, planted.store, evaluation.path, config, progress=False)
    strip = lambda s: {k: v for k, v in s.items() if k != "timings"}  # noqa: E731
    assert strip(again.scores) == strip(evaluation.scores)
    assert again.scores["timings"]["codes trained"] < evaluation.scores["timings"]["codes trained"]


def test_code_pass_equals_dense_reference(planted: Planted) -> None:
    sae = SAE.load(planted.sae_dir)
    store = planted.store
    images = np.arange(0, store.n_images, 3)
    patch_images = images[::4]
    codes = image_codes(
        SAECodes(sae, "trained"),
        store,
        LAYER,
        tokens="patch",
        images=images,
        patch_images=patch_images,
        raw=True,
        batch_images=7,
        progress=False,
    )
    acts = np.concatenate([a for _, a in store.ordered(LAYER, images=images)])[:, 1:]
    with torch.inference_mode():
        dense = sae.encode(torch.from_numpy(acts.reshape(-1, acts.shape[-1]))).numpy()
    dense = dense.reshape(len(images), -1, sae.n_latents)
    np.testing.assert_allclose(codes.aggregate("max").toarray(), dense.max(1), rtol=1e-6)
    np.testing.assert_allclose(
        codes.aggregate("mean").toarray(), dense.mean(1), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(
        codes.aggregate("fraction").toarray(), (dense > 0).mean(1).astype(np.float32)
    )
    np.testing.assert_allclose(codes.raw, acts.max(1), rtol=1e-6)
    rows = np.searchsorted(images, patch_images)
    np.testing.assert_array_equal(
        codes.patch_fire.toarray(), (dense[rows] > 0).reshape(-1, sae.n_latents)
    )
    # quantile rule: on where the max exceeds the latent's 0.9-quantile over the images
    q = codes.binary("quantile:0.9").toarray()
    mx = dense.max(1)
    for j in range(sae.n_latents):
        thr = np.sort(mx[:, j])[int(np.floor(0.9 * len(mx)))]
        np.testing.assert_array_equal(q[:, j], mx[:, j] > thr)
    # every rule leaves the codes as they were (scipy matrices share arrays they are built from)
    for rule in ("any", "fraction:0.1", "quantile:0.5"):
        codes.binary(rule).eliminate_zeros()
    np.testing.assert_allclose(codes.aggregate("max").toarray(), dense.max(1), rtol=1e-6)
    part = codes.subset(np.array([0, 2, 3]))
    np.testing.assert_array_equal(part.aggregate("max").toarray(), dense.max(1)[[0, 2, 3]])
    np.testing.assert_array_equal(part.images, images[[0, 2, 3]])
    top, _ = codes.top_images(5)
    for j in range(sae.n_latents):
        order = np.lexsort((np.arange(len(mx)), -mx[:, j]))[:5]
        live = mx[order, j] > 0
        np.testing.assert_array_equal(top[j][live], order[live])
        assert (top[j][~live] == -1).all()


def test_random_codes_have_the_sparsity_and_no_relation(planted: Planted) -> None:
    store = planted.store
    images = np.arange(40)
    a = image_codes(
        RandomCodes(50, 4, seed=1),
        store,
        LAYER,
        tokens="patch",
        images=images,
        batch_images=8,
        progress=False,
    )
    b = image_codes(
        RandomCodes(50, 4, seed=1),
        store,
        LAYER,
        tokens="patch",
        images=images,
        batch_images=8,
        progress=False,
    )
    np.testing.assert_array_equal(a.max, b.max)
    assert a.count.sum() == 4 * 40 * GRID[0] * GRID[1]


def test_random_codes_are_the_top_k_of_gaussians() -> None:
    # Renyi's order statistics and a uniform k-subset vs drawing every Gaussian and sorting
    source = RandomCodes(500, 8, seed=0)
    source.reseed(0)
    values, latents = source.encode_sparse(torch.zeros(20_000, 1))
    reference = torch.randn(20_000, 500, generator=torch.Generator().manual_seed(1)).topk(8).values
    assert (latents.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct latents per token
    counts = np.bincount(latents.ravel().numpy(), minlength=500)
    expected = 20_000 * 8 / 500
    assert abs(counts.mean() - expected) < 1e-9 and counts.std() < 2 * np.sqrt(expected)
    np.testing.assert_allclose(values.mean(0), reference.mean(0), atol=0.01)
    np.testing.assert_allclose(values.std(0), reference.std(0), rtol=0.05)
    assert (values[:, :-1] >= values[:, 1:]).all()  # largest first, as encode_sparse gives them


def test_cls_sae_is_scored_on_its_cls_codes(tmp_path: Path) -> None:
    p = _planted(tmp_path, cls_only=True)
    config = EvalConfig(
        image_rule="any", encoder="none", n_resamples=200, min_positives=3, baselines=("frozen",)
    )
    ev = evaluate(p.sae_dir, p.store, tmp_path / "ev", config, progress=False)
    names = {r["name"] for r in ev.scores["scores"]}
    assert "best_single_f1" in names and "locality" not in names
    assert not any(n.endswith("_patch") for n in names)
    assert _row(ev, "best_single_f1")["values"]["trained"]["value"] > 0.95
    assert ev.scores["settings"]["variants"] == ["trained", "frozen"]


def test_bad_inputs_are_one_line_errors(planted: Planted, tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="baselines"):
        EvalConfig(baselines=("frozen", "shuffled"))
    with pytest.raises(VisaeError, match="image rule"):
        EvalConfig(image_rule="quantile:2")
    with pytest.raises(VisaeError, match=r"no scores\.json"):
        Evaluation.load(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(VisaeError, match="schema"):
        Evaluation.load(tmp_path)


def test_a_shared_cache_serves_another_folder(planted: Planted, tmp_path: Path) -> None:
    config = EvalConfig(
        image_rule="any",
        encoder="none",
        n_resamples=100,
        min_positives=3,
        baselines=(),
        pairs="none",
    )
    shared = tmp_path / "shared"
    first = evaluate(
        planted.sae_dir, planted.store, tmp_path / "a" / "ev", config, cache=shared, progress=False
    )
    second = evaluate(
        planted.sae_dir, planted.store, tmp_path / "b" / "ev", config, cache=shared, progress=False
    )
    assert len(list(shared.glob("codes-trained-*.npz"))) == 1
    assert not (tmp_path / "a" / "ev" / "cache").exists()
    assert first.score("match@3") == second.score("match@3")
    assert first.scores["settings"]["variants"] == ["trained"]
