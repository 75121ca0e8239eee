"""The trainer: convergence on data with a known sparse dictionary, shared-stream sweeps,
exact resume after a real SIGKILL, schedules, metrics against a float64 reference, and errors."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import visae.train.trainer as trainer_module
from visae.cli import main
from visae.errors import VisaeError
from visae.sae import SAE, SAEConfig
from visae.store import LayerSpec, StoreSpec, StoreWriter
from visae.train import (
    RunSpec,
    SweepEntry,
    TrainConfig,
    Trainer,
    eval_recon,
    evaluate,
    expand_runs,
    heldout_from_record,
    train,
)
from visae.train.schedule import lr_factor, sparsity_factor

D, N_ATOMS, GRID = 32, 64, 4  # 16 patch tokens + 1 CLS per image


def sparse_dictionary_store(
    path: Path, n_images: int = 240, seed: int = 0, nan_image: int | None = None
) -> np.ndarray:
    """A store whose patch tokens are sums of 3 atoms of a fixed random dictionary plus an
    offset, so a 64-latent SAE can reconstruct them almost exactly."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((N_ATOMS, D)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    offset = rng.standard_normal(D).astype(np.float32)
    layout = {"n_cls": 1, "n_registers": 0, "grid": [GRID, GRID]}
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "h", "preprocessing": {}},
        dataset={"name": "sparse-dict", "fingerprint": f"seed{seed}"},
        layers=[LayerSpec(0, D, layout)],
        dtype="float32",
        tokens="all",
        shard_images=40,
    )
    with StoreWriter(path, spec, allow_nonfinite=nan_image is not None) as w:
        for lo in range(0, n_images, 40):
            n = min(40, n_images - lo)
            idx = rng.integers(0, N_ATOMS, (n, GRID * GRID + 1, 3))
            coef = rng.uniform(0.5, 2.0, (n, GRID * GRID + 1, 3)).astype(np.float32)
            acts = (coef[..., None] * atoms[idx]).sum(2) + offset
            if nan_image is not None and lo <= nan_image < lo + n:
                acts[nan_image - lo, 3, 0] = np.nan
            w.append_shard({0: acts}, [{"source": f"img{lo + i}"} for i in range(n)])
        w.finish()
    return atoms


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("train") / "store"
    sparse_dictionary_store(path)
    return path


def small_cfg(store: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(
        store=str(store),
        out=str(out),
        batch_size=256,
        total_tokens=256 * 80,
        lr_warmup_steps=5,
        sparsity_warmup_steps=10,
        eval_every_tokens=256 * 20,
        eval_tokens=2048,
        checkpoint_every_tokens=256 * 10,
        norm_sample_tokens=2048,
        holdout_fraction=0.1,
        prefetch=0,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def topk_run(name: str = "topk", **kw: object) -> RunSpec:
    settings = {"arch": "topk", "d": D, "n_latents": 2 * N_ATOMS, "k": 3} | kw
    return RunSpec(name, SAEConfig(**settings), 1e-2)  # type: ignore[arg-type]


def read_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_topk_learns_the_dictionary(store: Path, tmp_path: Path) -> None:
    finals = train(small_cfg(store, tmp_path / "out"), [topk_run()], progress=False)
    log = read_log(tmp_path / "out" / "topk" / "metrics.jsonl")
    evals = [r for r in log if r["kind"] == "eval"]
    # an eval at the first step that crosses each multiple of 5120 tokens, and at the end
    assert [r["tokens"] // 5120 for r in evals] == [1, 2, 3, 4] and evals[-1]["tokens"] == 20480
    assert all(r["tokens"] % 5120 < 256 for r in evals)
    assert evals[-1]["nmse"] < 0.15 and evals[-1]["nmse"] < evals[0]["nmse"] / 2
    assert evals[-1]["l0"] == pytest.approx(3.0)
    sae = SAE.load(finals["topk"])
    assert int(sae.tokens_seen) == 256 * 80
    assert sae.checkpoint_info["layer"] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["topk"]["nmse"] == evals[-1]["nmse"]
    assert not (tmp_path / "out" / "checkpoint").exists()
    weights = (tmp_path / "out" / "topk" / "sae" / "model.safetensors").read_bytes()
    again = train(small_cfg(store, tmp_path / "out"), [topk_run()], progress=False)
    assert again == finals and log == read_log(tmp_path / "out" / "topk" / "metrics.jsonl")
    assert (tmp_path / "out" / "topk" / "sae" / "model.safetensors").read_bytes() == weights


def test_sweep_shares_the_stream_without_changing_any_run(store: Path, tmp_path: Path) -> None:
    runs = [
        topk_run("a"),
        topk_run("b", k=5),
        RunSpec("c", SAEConfig(arch="relu", d=D, n_latents=N_ATOMS, l1_coeff=1e-3), 1e-3),
    ]
    together = train(
        small_cfg(store, tmp_path / "all", total_tokens=256 * 12), runs, progress=False
    )
    alone = train(
        small_cfg(store, tmp_path / "b", total_tokens=256 * 12), [runs[1]], progress=False
    )
    a, b = SAE.load(together["b"]), SAE.load(alone["b"])
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


TRAIN_SCRIPT = """
import sys
from visae.sae import SAEConfig
from visae.train import RunSpec, TrainConfig, train
store, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig(store=store, out=out, batch_size=128, total_tokens=128 * 150,
                  lr_warmup_steps=5, sparsity_warmup_steps=20, eval_every_tokens=128 * 40,
                  eval_tokens=1024, checkpoint_every_tokens=128 * 10, norm_sample_tokens=2048,
                  holdout_fraction=0.1, prefetch=2)
runs = [RunSpec("topk", SAEConfig(arch="topk", d=32, n_latents=64, k=3), 3e-3),
        RunSpec("batchtopk", SAEConfig(arch="batchtopk", d=32, n_latents=64, k=3), 3e-3),
        RunSpec("relu", SAEConfig(arch="relu", d=32, n_latents=64, l1_coeff=1e-3), 1e-3),
        RunSpec("jumprelu", SAEConfig(arch="jumprelu", d=32, n_latents=64), 1e-3),
        RunSpec("matryoshka", SAEConfig(arch="batchtopk", d=32, n_latents=64, k=3,
                                        matryoshka=(0.25, 0.5, 1.0)), 3e-3),
        RunSpec("bf16", SAEConfig(arch="topk", d=32, n_latents=64, k=3,
                                  compute_dtype="bfloat16"), 3e-3)]
train(cfg, runs, progress=False)
"""


@pytest.mark.slow
def test_killed_and_resumed_run_gives_the_same_weights(store: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))

    def run_to_end(out: Path) -> None:
        subprocess.run(
            [sys.executable, "-c", TRAIN_SCRIPT, str(store), str(out)], check=True, env=env
        )

    run_to_end(tmp_path / "ref")
    out = tmp_path / "killed"
    for delay in (0.3, 1.0):  # two kills at different moments, then run to the end
        proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(store), str(out)], env=env)
        deadline = time.time() + 120
        while not (out / "checkpoint").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 150 and not (out / "summary.json").exists()
    run_to_end(out)
    for name in ("topk", "batchtopk", "relu", "jumprelu", "matryoshka", "bf16"):
        a, b = SAE.load(tmp_path / "ref" / name / "sae"), SAE.load(out / name / "sae")
        for key, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[key]), (name, key)
        assert (tmp_path / "ref" / name / "metrics.jsonl").read_text() == (
            out / name / "metrics.jsonl"
        ).read_text()


def test_sparsity_warmup_reaches_the_loss(store: Path, tmp_path: Path) -> None:
    run = RunSpec("relu", SAEConfig(arch="relu", d=D, n_latents=N_ATOMS, l1_coeff=2e-3), 1e-3)
    train(
        small_cfg(store, tmp_path / "out", total_tokens=256 * 200, sparsity_warmup_steps=15),
        [run],
        progress=False,
    )
    log = [r for r in read_log(tmp_path / "out" / "relu" / "metrics.jsonl") if r["kind"] == "train"]
    scales = [r["sparsity_scale"] for r in log]
    assert scales[0] < 1 and scales[-1] == 1.0 and scales == sorted(scales)
    for r in log:
        assert r["sparsity"] == pytest.approx(
            r["sparsity_scale"] * 2e-3 * r["sparsity_penalty"], rel=1e-5
        )
        assert r["loss"] == pytest.approx(r["recon"] + r["sparsity"], rel=1e-5)
    # a warm-up longer than the run is capped at a tenth of it, so the full penalty still
    # reaches the loss
    train(
        small_cfg(store, tmp_path / "long", total_tokens=256 * 30, sparsity_warmup_steps=10**6),
        [run],
        progress=False,
    )
    log = read_log(tmp_path / "long" / "relu" / "metrics.jsonl")
    assert next(r["sparsity_scale"] for r in log if r["kind"] == "train") == 1.0  # step 10 of 30


def test_schedules() -> None:
    assert sparsity_factor(0, 10) == pytest.approx(0.1)
    assert sparsity_factor(9, 10) == 1.0 and sparsity_factor(500, 10) == 1.0
    assert sparsity_factor(0, 0) == 1.0
    f = [lr_factor(s, 100, 10, "cosine", 0.5) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10:50] == [1.0] * 40
    assert all(a >= b for a, b in itertools.pairwise(f[50:])) and f[-1] < 0.01
    lin = [lr_factor(s, 100, 0, "linear", 0.8) for s in range(100)]
    assert lin[79] == 1.0 and lin[90] == pytest.approx(0.5) and lin[-1] == pytest.approx(0.05)
    assert lr_factor(99, 100, 0, "constant", 0.0) == 1.0


def test_metrics_match_a_float64_reference() -> None:
    torch.manual_seed(0)
    sae = SAE.create(SAEConfig(arch="topk", d=16, n_latents=40, k=4))
    sae.set_normalization(torch.randn(16), 2.0)
    x = np.random.default_rng(1).standard_normal((700, 16)).astype(np.float32) * 3 + 1
    got = evaluate(sae, [x[:300], x[300:]])
    x_hat, codes, _ = sae(torch.from_numpy(x))
    x64, r = x.astype(np.float64), x.astype(np.float64) - x_hat.detach().double().numpy()
    c = codes.detach().numpy()
    assert got["nmse"] == pytest.approx((r**2).sum() / ((x64 - x64.mean(0)) ** 2).sum(), rel=1e-9)
    assert got["explained_variance"] == pytest.approx(
        1 - r.var(0).sum() / x64.var(0).sum(), rel=1e-9
    )
    assert got["mse"] == pytest.approx((r**2).mean(), rel=1e-9)
    assert got["l0"] == pytest.approx((c > 0).sum(1).mean())
    freq = (c > 0).mean(0)
    assert got["dead_fraction"] == pytest.approx((freq == 0).mean())
    assert got["dense_fraction"] == pytest.approx((freq > 0.01).mean())
    xh = x_hat.detach().double().numpy()
    cos = (x64 * xh).sum(1) / np.linalg.norm(x64, axis=1) / np.linalg.norm(xh, axis=1)
    assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-9)


def test_nan_store_names_shard_and_image(tmp_path: Path) -> None:
    sparse_dictionary_store(tmp_path / "s", n_images=80, nan_image=57)
    with pytest.raises(VisaeError, match=r"layer_00/shard_00001\.npy.*image 57 \(img57\)"):
        train(small_cfg(tmp_path / "s", tmp_path / "o"), [topk_run()], progress=False)


def test_width_mismatch_and_empty_store(store: Path, tmp_path: Path) -> None:
    wide = RunSpec("w", SAEConfig(arch="topk", d=48, n_latents=64, k=3), 1e-3)
    with pytest.raises(VisaeError, match=r"d=48 does not match the store's d=32"):
        train(small_cfg(store, tmp_path / "o"), [wide], progress=False)
    with pytest.raises(VisaeError, match=r"d=48 does not match the store's d=32"):
        expand_runs([SweepEntry({"arch": "topk", "d": 48})], d=32)
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "h", "preprocessing": {}},
        dataset={"name": "e", "fingerprint": "e"},
        layers=[LayerSpec(0, D, {"n_cls": 0, "n_registers": 0, "grid": [2, 2]})],
        dtype="float32",
        tokens="all",
        shard_images=4,
    )
    with StoreWriter(tmp_path / "empty", spec) as w:
        w.finish()
    with pytest.raises(VisaeError, match="holds no patch tokens"):
        train(small_cfg(tmp_path / "empty", tmp_path / "o2"), [topk_run()], progress=False)


def test_beyond_one_epoch_continue_or_stop(
    store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    epoch = 216 * 16  # 240 images, 24 held out, 16 patch tokens each
    caplog.set_level(logging.WARNING)
    train(
        small_cfg(store, tmp_path / "stop", total_tokens=epoch * 2, beyond_epoch="stop"),
        [topk_run()],
        progress=False,
    )
    assert read_log(tmp_path / "stop" / "topk" / "metrics.jsonl")[-1]["tokens"] == epoch
    assert any("stopping after one epoch" in r.getMessage() for r in caplog.records)
    train(
        small_cfg(store, tmp_path / "go", total_tokens=epoch * 2 + 100),
        [topk_run()],
        progress=False,
    )
    assert read_log(tmp_path / "go" / "topk" / "metrics.jsonl")[-1]["tokens"] == epoch * 2 + 100
    assert any("tokens repeat" in r.getMessage() for r in caplog.records)


def test_other_run_in_the_same_folder_is_refused(store: Path, tmp_path: Path) -> None:
    train(small_cfg(store, tmp_path / "o", total_tokens=512), [topk_run()], progress=False)
    with pytest.raises(VisaeError, match="holds a different training run"):
        train(small_cfg(store, tmp_path / "o", total_tokens=1024), [topk_run()], progress=False)


def test_cli_sweep_and_eval_recon(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
[train]
store = "{store}"
batch_size = 256
total_tokens = 2560
eval_every_tokens = 1280
eval_tokens = 1024
norm_sample_tokens = 1024

[[sae]]
arch = "topk"
n_latents = 64
k = [2, 4]
lr = 0.003
""")
    assert main(["train", "--config", str(sweep), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "topk-n64-k2-lr0.003" in out and "topk-n64-k4-lr0.003" in out
    assert (
        main(
            [
                "eval-recon",
                str(tmp_path / "o" / "topk-n64-k4-lr0.003" / "sae"),
                str(store),
                "--quiet",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "nmse" in text and "l0                 4.000" in text


def id_store(path: Path, n_images: int = 120, shard_images: int = 20) -> None:
    """A store whose every token carries its image id in dimension 0 (exact in float32), so
    a batch says which images it came from."""
    rng = np.random.default_rng(3)
    layout = {"n_cls": 1, "n_registers": 0, "grid": [GRID, GRID]}
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "h", "preprocessing": {}},
        dataset={"name": "ids", "fingerprint": "ids"},
        layers=[LayerSpec(0, D, layout)],
        dtype="float32",
        tokens="all",
        shard_images=shard_images,
    )
    with StoreWriter(path, spec) as w:
        for lo in range(0, n_images, shard_images):
            acts = rng.standard_normal((shard_images, GRID * GRID + 1, D)).astype(np.float32)
            acts[:, :, 0] = np.arange(lo, lo + shard_images)[:, None]
            w.append_shard({0: acts}, [{"source": f"img{lo + i}"} for i in range(shard_images)])
        w.finish()


def test_heldout_images_are_recorded_and_never_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    id_store(tmp_path / "s")
    seen: set[int] = set()
    original = SAE.train_step

    def recording(self: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, **kw: object):
        seen.update(int(i) for i in x[:, 0].tolist())
        return original(self, opt, x, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SAE, "train_step", recording)
    cfg = small_cfg(tmp_path / "s", tmp_path / "o", total_tokens=None, holdout_fraction=0.2)
    finals = train(cfg, [topk_run()], progress=False)
    sae = SAE.load(finals["topk"])
    held = heldout_from_record(sae.checkpoint_info["metadata"]["holdout"])
    assert len(held) == 24 and not seen & set(held.tolist())
    assert seen == set(range(120)) - set(held.tolist())  # one epoch: every training image
    # eval-recon defaults to exactly those images, and says so
    monkeypatch.undo()
    assert main(["eval-recon", str(finals["topk"]), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "images    24 (the images its trainer held out)" in out
    assert main(["eval-recon", str(finals["topk"]), "--images", "all", "--quiet"]) == 0
    assert "120 (all images, including the SAE's training images)" in capsys.readouterr().out
    id_store(tmp_path / "other", n_images=40)
    assert main(["eval-recon", str(finals["topk"]), str(tmp_path / "other"), "--quiet"]) == 0
    assert "40 (all images; the store is not the one" in capsys.readouterr().out
    with pytest.raises(VisaeError, match="not the store the SAE was trained on"):
        eval_recon(finals["topk"], tmp_path / "other", images="heldout", progress=False)


def test_samples_are_uniform_over_the_store_and_eval_comes_from_heldout(tmp_path: Path) -> None:
    id_store(tmp_path / "s", n_images=200)
    trainer = Trainer(
        small_cfg(tmp_path / "s", tmp_path / "o", norm_sample_tokens=2000, eval_tokens=300),
        [topk_run()],
        progress=False,
    )
    ids = trainer._norm_sample()[:, 0].astype(int)
    assert len(ids) == 2000 and set(ids) <= set(trainer.train_images.tolist())
    # every tenth of the store (10 shards) gets its share of the sample: chi-square, 9 dof
    counts = np.bincount(ids // 20, minlength=10)
    share = np.bincount(trainer.train_images // 20, minlength=10) / len(trainer.train_images)
    expected = share * len(ids)
    assert ((counts - expected) ** 2 / expected).sum() < 27.9  # p = 0.001
    eval_ids = trainer._eval_tokens()[:, 0].astype(int)
    assert len(eval_ids) == 300 and set(eval_ids) <= set(trainer.eval_images.tolist())


def test_multi_epoch_run_takes_every_step_at_a_positive_rate(tmp_path: Path) -> None:
    id_store(tmp_path / "s", n_images=100)
    epoch = 90 * 16  # 10 images held out; 1440 tokens = 5 batches of 256 and one of 160
    cfg = small_cfg(tmp_path / "s", tmp_path / "o", total_tokens=epoch * 2 + 300, lr_decay="linear")
    trainer = Trainer(cfg, [topk_run()], progress=False)
    assert trainer.total_steps == 2 * 6 + 2
    lrs = []
    original = lr_factor

    def spy(step: int, total: int, *rest: object) -> float:
        lrs.append(original(step, total, *rest))  # type: ignore[arg-type]
        return lrs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "lr_factor", spy)
        finals = trainer.run()
    assert len(lrs) == 14 and min(lrs) > 0
    meta = SAE.load(finals["topk"]).checkpoint_info["metadata"]
    assert meta["train_step"] == meta["total_steps"] == 14
    assert meta["train_tokens"] == epoch * 2 + 300


def test_dead_window_scales_with_the_run_and_auxk_acts(store: Path, tmp_path: Path) -> None:
    # 512 latents for 64 atoms at k=3: most latents never win, so some die within the run
    run = RunSpec("wide", SAEConfig(arch="topk", d=D, n_latents=512, k=3), 1e-2)
    finals = train(small_cfg(store, tmp_path / "o"), [run], progress=False)
    sae = SAE.load(finals["wide"])
    assert sae.cfg.dead_after_tokens == 2048  # a tenth of the 20480-token run
    log = read_log(tmp_path / "o" / "wide" / "metrics.jsonl")
    assert max(r["auxk"] for r in log if r["kind"] == "train") > 0
    assert max(r["train_dead_fraction"] for r in log if r["kind"] == "eval") > 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["wide"]["dead_after_tokens"] == 2048


def test_batchtopk_calibrated_l0_is_within_ten_percent_of_k(store: Path, tmp_path: Path) -> None:
    run = RunSpec("b", SAEConfig(arch="batchtopk", d=D, n_latents=2 * N_ATOMS, k=4), 1e-2)
    finals = train(small_cfg(store, tmp_path / "o"), [run], progress=False)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["b"]["l0"] == pytest.approx(4, rel=0.1)
    assert SAE.load(finals["b"]).threshold > 0


def test_n_latents_and_expansion_together_are_refused() -> None:
    with pytest.raises(VisaeError, match="n_latents or as expansion, not both"):
        expand_runs([SweepEntry({"arch": "topk", "n_latents": 64, "expansion": 2})], d=D)
