"""Analysis pass: streaming statistics and top-N lists against brute-force references, the
artifact's contents and loader, error messages, thumbnails and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from visae.analysis import (
    Analysis,
    AnalysisConfig,
    HistogramSpec,
    LatentStats,
    TopN,
    run_analysis,
    stream_pass,
)
from visae.analysis.accumulate import PatchCodes
from visae.analysis.plots import (
    plot_frequency_histogram,
    plot_latent_histogram,
    plot_nmse_l0,
    read_training_logs,
)
from visae.analysis.thumbs import model_view
from visae.backbones.base import TokenLayout
from visae.errors import VisaeError
from visae.sae import SAE, SAEConfig
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter

LAYER = 3
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 220)}
PREPROCESSING = {
    "resize": {"shortest_edge": 64},
    "resample": "bilinear",
    "center_crop": [56, 70],
    "rescale_factor": 1 / 255,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "output_size": [56, 70],
    "source": "test",
}


# ---------------------------------------------------------------- a tiny real pipeline


class ListDataset:
    """An in-memory ImageDataset (the protocol of visae.data.base)."""

    name = "test-shapes"

    def __init__(self, images: list[Image.Image], metadata: list[dict[str, Any]], fp: str):
        self._images, self._meta, self.fingerprint = images, metadata, fp

    def __len__(self) -> int:
        return len(self._images)

    def image(self, i: int) -> Image.Image:
        return self._images[i]

    def metadata(self, i: int) -> dict[str, Any]:
        return self._meta[i]


@dataclass
class Pipeline:
    store: ActivationStore
    sae_dir: Path
    sae: SAE
    images: list[Image.Image]
    metadata: list[dict[str, Any]]


def make_images(root: Path, n: int, seed: int = 0) -> tuple[list[Image.Image], list[dict]]:
    """Grey images with one coloured rectangle each, saved as PNG; label = its colour."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, meta = [], []
    for i in range(n):
        color = list(COLORS)[i % 3]
        im = Image.new("RGB", (96, 80), (200, 200, 200))
        x, y = int(rng.integers(0, 60)), int(rng.integers(0, 50))
        ImageDraw.Draw(im).rectangle([x, y, x + 30, y + 25], fill=COLORS[color])
        path = root / f"img_{i:03d}.png"
        im.save(path)
        images.append(im)
        meta.append({"source": str(path), "labels": [color, "big" if i % 2 else "small"]})
    return images, meta


def make_pipeline(
    root: Path,
    *,
    n_images: int = 23,
    arch: str = "topk",
    n_latents: int = 40,
    k: int = 4,
    d: int = 16,
    grid: tuple[int, int] = (4, 5),
    n_cls: int = 1,
    seed: int = 0,
    dead: Sequence[int] = (),
    skip_first: bool = False,
) -> Pipeline:
    """A store written with the store's writer and an SAE saved as a checkpoint.

    Activations are multiples of 1/4 in [-2, 2] and encoder weights multiples of 1/8 in
    [-1, 1]: every pre-activation is then exact in float32, so SAE codes do not depend on how
    tokens are batched, and equal values (ties) are frequent. `dead` latents get a bias that
    keeps them from ever firing (ReLU). `skip_first` records the dataset's first image as
    unreadable (as extraction does): store image i is then dataset image i + 1.
    """
    rng = np.random.default_rng(seed)
    images, meta = make_images(root / "images", n_images, seed)
    layout = TokenLayout(n_cls, 1, grid)
    acts = rng.integers(-8, 9, size=(n_images, layout.n_tokens, d)).astype(np.float32) / 4
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "toy-hash", "preprocessing": PREPROCESSING},
        dataset={"name": ListDataset.name, "fingerprint": f"fp-{seed}-{n_images}"},
        layers=[LayerSpec(LAYER, d, layout)],
        shard_images=7,
    )
    offset = int(skip_first)
    stored_meta = [{**m, "dataset_index": i + offset} for i, m in enumerate(meta)]
    skipped = [{"index": 0, "source": "unreadable.png", "reason": "test"}] if skip_first else []
    with StoreWriter(root / "store", spec) as w:
        for lo in range(0, n_images, 7):
            w.append_shard(
                {LAYER: acts[lo : lo + 7]}, stored_meta[lo : lo + 7], skipped if lo == 0 else []
            )
        w.finish()
    store = ActivationStore.open(root / "store")
    sae = SAE.create(SAEConfig(arch=arch, d=d, n_latents=n_latents, k=k, seed=seed))
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(rng.integers(-8, 9, size=(n_latents, d)) / 8).float())
        if dead:
            sae.b_enc[list(dead)] = -1e4
    sae.set_normalization(torch.zeros(d), 1.0)
    tokens = "all" if n_cls else "patch"
    sae_dir = sae.save(root / "sae", store=store.identity(), layer=LAYER, tokens=tokens)
    return Pipeline(store, sae_dir, SAE.load(sae_dir), images, meta)


def reference_codes(p: Pipeline) -> tuple[np.ndarray, np.ndarray | None]:
    """Dense codes of every patch `[images, patches, L]` and CLS token `[images, L]`, from one
    `sae.encode` call over all tokens."""
    layout = p.store.layout(LAYER)
    acts = np.concatenate([a for _, a in p.store.ordered(LAYER)])
    with torch.inference_mode():
        codes = p.sae.encode(torch.from_numpy(acts.reshape(-1, acts.shape[-1]))).numpy()
    codes = codes.reshape(acts.shape[0], layout.n_tokens, -1)
    cls = codes[:, 0] if layout.n_cls else None
    return codes[:, layout.n_special :], cls


def reference_top(scores: np.ndarray, n: int) -> list[list[int]]:
    """Per latent: images with score > 0, by score descending then image ascending, first n."""
    return [
        sorted(
            (i for i in range(scores.shape[0]) if scores[i, j] > 0),
            key=lambda i: (-scores[i, j], i),
        )[:n]
        for j in range(scores.shape[1])
    ]


def reference_strongest(row: np.ndarray, k: int) -> list[int]:
    return sorted((j for j in range(row.size) if row[j] > 0), key=lambda j: (-row[j], j))[:k]


def reference_hist(values: np.ndarray, spec: HistogramSpec) -> np.ndarray:
    bins = np.floor(
        (np.log10(values.astype(np.float64)) - math.log10(spec.lo)) * spec.bins_per_decade
    )
    return np.bincount(np.clip(bins, 0, spec.n_bins - 1).astype(int), minlength=spec.n_bins)


# ---------------------------------------------------------------- accumulators


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topn_and_stats_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img, p, n_lat, n = 61, 6, 17, 5
    # few distinct values: many exact ties, which must go to the lower image id
    codes = rng.integers(0, 4, size=(n_img, p, n_lat)).astype(np.float32) * 0.5
    codes[rng.random(codes.shape) < 0.6] = 0
    codes[:, :, 3] = 0  # a dead latent
    cls = rng.integers(0, 3, size=(n_img, n_lat)).astype(np.float32)
    spec = HistogramSpec(lo=0.1, hi=10.0, bins_per_decade=4)
    tops = {r: TopN(n_lat, n, p) for r in ("max", "mean", "cls")}
    stats = LatentStats(n_lat, spec, with_cls=True)
    entered_all: set[int] = set()
    start = 0
    while start < n_img:  # random batch sizes: the result must not depend on them
        stop = min(n_img, start + int(rng.integers(1, 9)))
        ids = torch.arange(start, stop)
        sp = PatchCodes.from_dense(torch.from_numpy(codes[start:stop]))
        img_max = sp.per_image("amax")
        np.testing.assert_array_equal(img_max.numpy(), codes[start:stop].max(1))
        np.testing.assert_allclose(sp.per_image("sum").numpy(), codes[start:stop].sum(1))
        cls_b = torch.from_numpy(cls[start:stop])
        stats.update(sp, img_max, cls_b)
        for r, scores in (("max", img_max), ("mean", sp.per_image("sum") / p), ("cls", cls_b)):
            entered_all.update(tops[r].update(ids, scores, sp).tolist())
        start = stop

    expected_scores = {"max": codes.max(1), "mean": codes.sum(1) / p, "cls": cls}
    for r, top in tops.items():
        want = reference_top(expected_scores[r], n)
        maps = top.maps.numpy()
        for j in range(n_lat):
            got = [int(i) for i in top.images[j] if i >= 0]
            assert got == want[j], (r, j)
            np.testing.assert_allclose(
                top.values[j, : len(got)].numpy(), expected_scores[r][want[j], j], rtol=1e-6
            )
            assert (top.images[j, len(got) :] == -1).all()
            for slot, i in enumerate(got):
                np.testing.assert_array_equal(maps[j, slot], codes[i, :, j].astype(np.float16))
            assert not maps[j, len(got) :].any()
        assert set(top.images[top.images >= 0].tolist()) <= entered_all
    assert not tops["max"].values[3].isfinite().any()

    np.testing.assert_array_equal(stats.fire_patch.numpy(), (codes > 0).sum((0, 1)))
    np.testing.assert_array_equal(stats.fire_image.numpy(), (codes.max(1) > 0).sum(0))
    np.testing.assert_array_equal(stats.fire_cls.numpy(), (cls > 0).sum(0))
    np.testing.assert_allclose(stats.sum_patch.numpy(), codes.sum((0, 1)), rtol=1e-12)
    np.testing.assert_array_equal(stats.max_patch.numpy(), codes.max((0, 1)))
    np.testing.assert_array_equal(stats.max_cls.numpy(), cls.max(0))
    for j in range(n_lat):
        v = codes[:, :, j][codes[:, :, j] > 0]
        np.testing.assert_array_equal(stats.hist[j].numpy(), reference_hist(v, spec))
    assert stats.n_images == n_img and stats.n_patch_tokens == n_img * p


def test_topn_refuses_out_of_order_images() -> None:
    top = TopN(3, 2, 2)
    sp = PatchCodes.from_dense(torch.ones(2, 2, 3))
    top.update(torch.tensor([4, 5]), torch.ones(2, 3), sp)
    with pytest.raises(ValueError, match="increasing"):
        top.update(torch.tensor([5, 6]), torch.ones(2, 3), sp)


def test_strongest_per_patch_orders_by_value_then_latent() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 3, size=(4, 3, 9)).astype(np.float32)
    sp = PatchCodes.from_dense(torch.from_numpy(codes))
    lats, vals = sp.strongest(torch.tensor([1, 3]), 4)
    assert lats.shape == (2, 3, 4)
    for m, i in enumerate([1, 3]):
        for q in range(3):
            want = reference_strongest(codes[i, q], 4)
            got = lats[m, q].tolist()
            assert got == want + [-1] * (4 - len(want))
            np.testing.assert_array_equal(vals[m, q, : len(want)].numpy(), codes[i, q, want])


# ---------------------------------------------------------------- the pass end to end


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_run_analysis_matches_brute_force(tmp_path: Path, arch: str) -> None:
    p = make_pipeline(tmp_path, arch=arch, dead=(7,) if arch == "relu" else ())
    cfg = AnalysisConfig(
        top_n=4,
        sample_images=5,
        patch_codes_k=6,
        batch_images=3,
        encode_tokens=25,
        histogram=HistogramSpec(lo=0.01, hi=100.0, bins_per_decade=8),
    )
    a = run_analysis(p.sae_dir, p.store, tmp_path / "analysis", config=cfg, progress=False)
    patch, cls = reference_codes(p)
    n_img, n_patch, n_lat = patch.shape
    assert cls is not None
    assert (a.n_latents, a.n_images, a.grid, a.top_n) == (n_lat, n_img, (4, 5), 4)
    assert a.rankings == ["max", "mean", "cls"]
    assert a.meta["layer"] == LAYER and a.meta["sae"]["trained_layer"] == LAYER

    t = a.table
    fire = (patch > 0).sum((0, 1))
    np.testing.assert_array_equal(t["fire_patch"], fire)
    np.testing.assert_array_equal(t["freq_patch"], fire / (n_img * n_patch))
    np.testing.assert_array_equal(t["fire_image"], (patch.max(1) > 0).sum(0))
    np.testing.assert_array_equal(t["fire_cls"], (cls > 0).sum(0))
    np.testing.assert_allclose(t["freq_cls"], (cls > 0).mean(0))
    np.testing.assert_allclose(t["mean_patch"], patch.mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(t["max_patch"], patch.max((0, 1)))
    np.testing.assert_allclose(t["max_cls"], cls.max(0))
    np.testing.assert_allclose(t["mean_cls"], cls.mean(0), rtol=1e-6)
    live = fire > 0
    np.testing.assert_allclose(
        t["mean_active"][live], patch.sum((0, 1))[live] / fire[live], rtol=1e-6
    )
    np.testing.assert_array_equal(t["dead"], ((fire == 0) & ((cls > 0).sum(0) == 0)).astype(int))
    if arch == "relu":
        assert t["dead"][7] == 1 and a.meta["n_dead"] >= 1
        assert a.top(7, "max") == [] and np.isnan(t["mean_active"][7])
    for j in range(n_lat):
        v = patch[:, :, j][patch[:, :, j] > 0]
        np.testing.assert_array_equal(a.hist[j], reference_hist(v, cfg.histogram))

    scores = {"max": patch.max(1), "mean": patch.mean(1), "cls": cls}
    top_images: set[int] = set()
    for r in a.rankings:
        want = reference_top(scores[r], cfg.top_n)
        values, images = a.top_arrays(r)
        for j in range(n_lat):
            entries = a.top(j, r)
            assert [e.image for e in entries] == want[j], (r, j)
            np.testing.assert_allclose([e.value for e in entries], scores[r][want[j], j], rtol=1e-6)
            for e in entries:
                np.testing.assert_allclose(
                    e.map, patch[e.image, :, j].reshape(4, 5).astype(np.float16), rtol=0
                )
            top_images.update(want[j])
        assert (images[values == 0] == -1).all()

    rng = np.random.default_rng(cfg.seed)
    sample = set(rng.choice(n_img, cfg.sample_images, replace=False).tolist())
    assert set(a.sample_images) == sample
    assert a.code_images.tolist() == sorted(top_images | sample)
    for i in a.code_images.tolist():
        lat, val = a.patch_codes(i)
        assert lat.shape == (n_patch, cfg.patch_codes_k)
        for q in range(n_patch):
            want = reference_strongest(patch[i, q], cfg.patch_codes_k)
            assert lat[q].tolist() == want + [-1] * (cfg.patch_codes_k - len(want))
            np.testing.assert_allclose(val[q, : len(want)], patch[i, q, want], rtol=1e-3)
        cl, _ = a.cls_codes(i)
        want = reference_strongest(cls[i], cfg.patch_codes_k)
        assert cl[: len(want)].tolist() == want
        j = want[0] if want else 0
        np.testing.assert_allclose(
            a.latent_map(i, j).ravel(),
            np.where(
                np.isin(
                    np.arange(n_patch),
                    [
                        q
                        for q in range(n_patch)
                        if j in reference_strongest(patch[i, q], cfg.patch_codes_k)
                    ],
                ),
                patch[i, :, j],
                0,
            ),
            rtol=1e-3,
        )

    # labels, thumbnails and the per-latent label summary
    assert set(a.images) == set(a.code_images.tolist())
    for i, info in a.images.items():
        assert info["labels"] == p.metadata[i]["labels"]
        assert a.thumbnail(i).is_file()
    assert len(list((a.path / "thumbs").iterdir())) == len(a.images)
    base = {
        lab: sum(lab in m["labels"] for m in p.metadata) / n_img
        for lab in ("red", "green", "blue", "big", "small")
    }
    n_labelled = 0
    for j in range(n_lat):
        imgs = [e.image for e in a.top(j, "max")]
        lift = (
            {
                lab: sum(lab in p.metadata[i]["labels"] for i in imgs) / len(imgs) - b
                for lab, b in base.items()
            }
            if imgs
            else {}
        )
        best = max(lift.values(), default=0.0)
        if best <= 0:
            assert t["top_label"][j] == "" and np.isnan(t["top_label_frac"][j])
            continue
        n_labelled += 1
        lab = t["top_label"][j]
        assert lift[lab] == pytest.approx(best)
        assert t["top_label_base"][j] == pytest.approx(base[lab])
        assert t["top_label_frac"][j] == pytest.approx(best + base[lab])
    assert n_labelled > 0
    assert Image.open(a.path / "plots" / "frequency.png").size[0] > 100


def test_stream_pass_holds_codes_only_for_listed_and_sample_images(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_images=40, n_latents=12, k=2)
    cfg = AnalysisConfig(top_n=2, sample_images=3, patch_codes_k=2, batch_images=1)
    res = stream_pass(p.sae, p.store, LAYER, cfg, progress=False)
    listed = {int(i) for t in res.tops.values() for i in t.images.flatten() if i >= 0}
    assert set(res.codes) == listed | set(res.sample.tolist())
    assert len(listed) < 40  # most images were held at some point and evicted


def test_store_without_cls_and_dataset_thumbnails(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_cls=0, n_images=9, skip_first=True)
    for f in (tmp_path / "images").iterdir():  # the sources are gone; the dataset renders
        f.unlink()
    # the dataset holds the skipped image first: store image i is dataset image i + 1
    blank = Image.new("RGB", (96, 80), (0, 0, 0))
    ds = ListDataset(
        [blank, *p.images], [{}, *p.metadata], p.store.identity()["dataset_fingerprint"]
    )
    a = run_analysis(
        p.sae,
        p.store,
        tmp_path / "a",
        dataset=ds,
        progress=False,
        config=AnalysisConfig(top_n=3, sample_images=2, thumb_size=70),
    )
    for i in a.images:
        thumb = np.asarray(Image.open(a.thumbnail(i)).convert("RGB"), dtype=np.float32)
        view = model_view(p.images[i], PREPROCESSING)
        assert np.abs(thumb - np.asarray(view, dtype=np.float32)).mean() < 4.0
    assert a.rankings == ["max", "mean"] and a.cls_codes(int(a.code_images[0])) is None
    assert np.isnan(a.table["freq_cls"]).all()
    assert a.name == f"sae · toy · layer {LAYER}"  # the checkpoint folder's name


def test_thumbnail_is_the_model_view(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_images=6)
    a = run_analysis(
        p.sae_dir, p.store, tmp_path / "a", progress=False, config=AnalysisConfig(thumb_size=70)
    )
    i = int(a.code_images[0])
    thumb = np.asarray(Image.open(a.thumbnail(i)).convert("RGB"), dtype=np.float32)
    # by hand: 96x80 -> shorter side 64 -> 76x64 -> centre crop 70x56 at (3, 4)
    view = p.images[i].resize((76, 64), Image.Resampling.BILINEAR).crop((3, 4, 73, 60))
    assert thumb.shape == (56, 70, 3)
    assert np.abs(thumb - np.asarray(view, dtype=np.float32)).mean() < 4.0
    assert model_view(p.images[i], {}).size == (96, 80)
    assert model_view(p.images[i], {"resize": {"height": 30, "width": 40}}).size == (40, 30)


# ---------------------------------------------------------------- errors and the loader


def test_bad_inputs_raise_one_line_errors(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_images=8)
    out = tmp_path / "a"
    run_analysis(p.sae, p.store, out, progress=False)
    with pytest.raises(VisaeError, match="exists"):
        run_analysis(p.sae, p.store, out, progress=False)
    run_analysis(p.sae, p.store, out, overwrite=True, progress=False)
    with pytest.raises(VisaeError, match="layer 5 is not in store"):
        run_analysis(p.sae, p.store, tmp_path / "b", layer=5, progress=False)
    wide = SAE.create(SAEConfig(arch="topk", d=32, n_latents=8, k=2))
    with pytest.raises(VisaeError, match=r"SAE width d=32 does not match store .* width d=16"):
        run_analysis(wide, p.store, tmp_path / "b", layer=LAYER, progress=False)
    p.sae.checkpoint_info["store"] = {"weights_hash": "another-model"}
    with pytest.raises(VisaeError, match="another model"):
        run_analysis(p.sae, p.store, tmp_path / "b", progress=False)
    p.sae.checkpoint_info["store"] = None
    wrong = ListDataset(p.images, p.metadata, "other-fingerprint")
    with pytest.raises(VisaeError, match="not the one"):
        run_analysis(p.sae, p.store, tmp_path / "b", dataset=wrong, progress=False)
    short = ListDataset(p.images[:3], p.metadata[:3], p.store.identity()["dataset_fingerprint"])
    with pytest.raises(VisaeError, match="has 3 images"):
        run_analysis(p.sae, p.store, tmp_path / "b", dataset=short, progress=False)
    for missing in ("img_005.png", "img_000.png"):  # found after the pass / before it
        (tmp_path / "images" / missing).unlink()
        with pytest.raises(VisaeError, match=missing.replace(".", r"\.")):
            run_analysis(
                p.sae,
                p.store,
                tmp_path / "b",
                config=AnalysisConfig(sample_images=8),
                progress=False,
            )
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
    with pytest.raises(VisaeError, match="top_n"):
        AnalysisConfig(top_n=0)


def test_loader_checks_format_and_stores_metrics(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_images=8)
    a = run_analysis(p.sae, p.store, tmp_path / "a", progress=False)
    values = np.linspace(0, 1, a.n_latents)
    a.add_metric("ms", values)
    a.add_metric("other", values * 2)
    a.add_metric("ms", values[::-1])
    again = Analysis.load(a.path)
    assert sorted(again.metrics) == ["ms", "other"]
    np.testing.assert_array_equal(again.metrics["ms"], values[::-1])
    with pytest.raises(VisaeError, match="shape"):
        a.add_metric("bad", values[:3])
    with pytest.raises(VisaeError, match="not allowed"):
        a.add_metric("freq_patch", values)
    with pytest.raises(VisaeError, match="out of range"):
        a.top(a.n_latents)
    with pytest.raises(VisaeError, match="no ranking"):
        a.top(0, "median")
    with pytest.raises(VisaeError, match="no per-patch codes"):
        a.patch_codes(10_000)

    meta = json.loads((a.path / "analysis.json").read_text())
    meta["schema_version"] = 99
    (a.path / "analysis.json").write_text(json.dumps(meta))
    with pytest.raises(VisaeError, match="schema_version 99"):
        Analysis.load(a.path)
    with pytest.raises(VisaeError, match="not a visae analysis"):
        Analysis.load(tmp_path / "store")
    meta["schema_version"] = 1
    (a.path / "analysis.json").write_text(json.dumps(meta))
    (a.path / "hist.npy").unlink()
    with pytest.raises(VisaeError, match=r"missing hist\.npy"):
        _ = Analysis.load(a.path).hist


# ---------------------------------------------------------------- plots


def test_plots(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_images=8)
    a = run_analysis(p.sae, p.store, tmp_path / "a", progress=False)
    freq = plot_frequency_histogram(a, tmp_path / "f.png")
    hist = plot_latent_histogram(a, int(np.argmax(a.table["fire_patch"])), tmp_path / "h.png")
    with pytest.raises(VisaeError, match="out of range"):
        plot_latent_histogram(a, -1, tmp_path / "x.png")
    logs = []
    for sweep, k in (("sweep_a", 8), ("sweep_b", 16)):
        # the trainer's layout: <out>/<run>/metrics.jsonl with train and eval records
        path = tmp_path / sweep / "topk" / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        recs = [
            {"kind": kind, "tokens": t, "nmse": 1 / (t + k), "l0": k + 0.1 * t}
            for t in (1, 2, 3)
            for kind in ("train", "eval")
        ]
        recs.insert(1, {"kind": "train", "tokens": 2, "lr": 1e-3})  # no nmse: skipped
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        logs.append(path)
    runs = read_training_logs([tmp_path / "sweep_a", logs[1]])
    assert sorted(runs) == ["sweep_b/topk", "topk"]
    assert [r["tokens"] for r in runs["topk"]] == [1, 2, 3]
    assert all(r["kind"] == "eval" for r in runs["sweep_b/topk"])
    (tmp_path / "plain.jsonl").write_text(json.dumps({"sae": "relu", "nmse": 0.2, "l0": 40}))
    assert list(read_training_logs([tmp_path / "plain.jsonl"])) == ["relu"]
    trade = plot_nmse_l0(logs, tmp_path / "plots" / "nmse_l0.png")
    family = {"topk": "TopK", "sweep_b/topk": "TopK"}
    curves = plot_nmse_l0(logs, tmp_path / "plots" / "families.png", groups=family)
    for png in (freq, hist, trade, curves):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 300
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
    with Image.open(trade) as a, Image.open(curves) as b:  # one family line, not two runs
        assert np.asarray(a).shape == np.asarray(b).shape
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "empty.jsonl").write_text('{"tokens": 1}\n')
    with pytest.raises(VisaeError, match="no records"):
        plot_nmse_l0([tmp_path / "empty.jsonl"], tmp_path / "e.png")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(VisaeError, match=r"broken\.jsonl:1"):
        read_training_logs([tmp_path / "broken.jsonl"])


def test_statistics_count_only_the_token_kinds_the_sae_was_trained_on(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, n_images=12, arch="relu")
    patch, cls = reference_codes(p)
    assert cls is not None and (cls > 0).any()
    cfg = AnalysisConfig(top_n=3, sample_images=2)
    patch_dir = p.sae.save(
        tmp_path / "sae-patch", store=p.store.identity(), layer=LAYER, tokens="patch"
    )
    a = run_analysis(patch_dir, p.store, tmp_path / "patch", config=cfg, progress=False)
    assert a.rankings == ["max", "mean"] and a.meta["tokens"] == "patch"
    fire = (patch > 0).sum((0, 1))
    assert (a.table["fire_cls"] == 0).all()
    np.testing.assert_array_equal(a.table["dead"], (fire == 0).astype(int))
    cls_dir = p.sae.save(tmp_path / "sae-cls", store=p.store.identity(), layer=LAYER, tokens="cls")
    a = run_analysis(cls_dir, p.store, tmp_path / "cls", config=cfg, progress=False)
    assert "cls" in a.rankings and a.meta["tokens"] == "cls"
    np.testing.assert_array_equal(a.table["fire_cls"], (cls > 0).sum(0))
    np.testing.assert_array_equal(a.table["dead"], ((cls > 0).sum(0) == 0).astype(int))
    asked = AnalysisConfig(top_n=3, sample_images=2, tokens="all")
    a = run_analysis(patch_dir, p.store, tmp_path / "all", config=asked, progress=False)
    assert a.rankings == ["max", "mean", "cls"] and (a.table["fire_cls"] > 0).any()


def test_cls_trained_sae_warns_that_patches_are_out_of_distribution(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = make_pipeline(tmp_path, n_images=6)
    run_analysis(p.sae, p.store, tmp_path / "a1", progress=False)
    assert not [r for r in caplog.records if "CLS tokens" in r.getMessage()]
    cls_dir = p.sae.save(tmp_path / "sae-cls", store=p.store.identity(), layer=LAYER, tokens="cls")
    run_analysis(cls_dir, p.store, tmp_path / "a2", progress=False)
    assert [r for r in caplog.records if "trained on CLS tokens" in r.getMessage()]
