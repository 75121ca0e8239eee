"""The one write mechanism: folders swapped in whole across real SIGKILLs (with and without the
kernel's atomic exchange), and full disks turned into one-line errors that leave the last good
state resumable, on a real size-limited tmpfs where the test may mount one and by an injected
ENOSPC everywhere."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import visae.atomic as atomic
from visae.atomic import atomic_directory, recover_directory, write_text
from visae.errors import VisaeError
from visae.sae import SAE, SAEConfig
from visae.store import LayerSpec, StoreSpec, StoreWriter
from visae.train import RunSpec, TrainConfig, train

SRC = str(Path(__file__).resolve().parents[1] / "src")

WRITER = """
import sys
import visae.atomic as atomic
out, exchange = sys.argv[1], sys.argv[2] == "1"
if not exchange:
    atomic._exchange = lambda a, b: False
version = 0
while True:
    version += 1
    with atomic.atomic_directory(out) as tmp:
        (tmp / "version").write_text(str(version))
        (tmp / "payload").write_bytes(str(version).encode() * 400_000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "version").write_text(str(version))
"""


def whole_version(out: Path) -> int:
    """The version a folder written by WRITER holds, asserting all its files agree."""
    version = (out / "version").read_text()
    assert (out / "sub" / "version").read_text() == version
    assert (out / "payload").read_bytes() == version.encode() * 400_000
    return int(version)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_folder_is_whole_after_sigkill_at_random_moments(tmp_path: Path, exchange: bool) -> None:
    out = tmp_path / "artifact"
    env = dict(os.environ, PYTHONPATH=SRC)
    rng = np.random.default_rng(0)
    versions = []
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out), "1" if exchange else "0"], env=env
        )
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover_directory(out)  # what the next writer does first
        versions.append(whole_version(out))
        assert not [p for p in tmp_path.iterdir() if p.name != "artifact"]
    assert max(versions) > 1


KILL_BETWEEN_RENAMES = """
import os, signal, sys
import visae.atomic as atomic
atomic._exchange = lambda a, b: False
out = sys.argv[1]
real_rename = os.rename
calls = []
def rename(a, b):
    calls.append(a)
    if len(calls) == 2:  # the old folder is moved aside; the new one never arrives
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(a, b)
os.rename = rename
with atomic.atomic_directory(out) as tmp:
    (tmp / "version").write_text("2")
"""


def test_kill_between_the_two_renames_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    with atomic_directory(out) as tmp:
        (tmp / "version").write_text("1")
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # killed mid-swap: only the moved-aside old version is there
    recover_directory(out)
    assert (out / "version").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_failed_block_leaves_the_previous_folder_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("old")

    def full(_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    disk_full = pytest.raises(VisaeError, match=r"^disk full while writing .*b$")
    with disk_full, atomic_directory(out) as tmp:
        (tmp / "a").write_text("new")
        atomic.write_file(tmp / "b", full)
    disk_full = pytest.raises(VisaeError, match=r"^disk full while writing .*artifact")
    with disk_full, atomic_directory(out):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]

    def denied(_: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(VisaeError, match=r"^cannot write .*c: Permission denied$"):
        atomic.write_file(out / "c", denied)
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_a_log_line_cut_by_a_kill_is_dropped(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    atomic.append_line(log, '{"step": 1}')
    with log.open("a") as f:
        f.write('{"step": 2, "lo')  # what a kill mid-append leaves
    assert atomic.read_lines(log) == ['{"step": 1}']
    write_text(log, "")
    assert atomic.read_lines(log) == []


# -- training on a full disk --------------------------------------------------------------

D = 32


def small_store(path: Path) -> None:
    rng = np.random.default_rng(0)
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "h", "preprocessing": {}},
        dataset={"name": "toy", "fingerprint": "toy"},
        layers=[LayerSpec(0, D, {"n_cls": 0, "n_registers": 0, "grid": [4, 4]})],
        dtype="float32",
        tokens="all",
        shard_images=40,
    )
    with StoreWriter(path, spec) as w:
        for lo in range(0, 120, 40):
            acts = rng.standard_normal((40, 16, D)).astype(np.float32)
            w.append_shard({0: acts}, [{"source": f"{lo + i}"} for i in range(40)])
        w.finish()


def config(store: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        store=str(store),
        out=str(out),
        batch_size=128,
        total_tokens=128 * 12,
        eval_every_tokens=128 * 6,
        eval_tokens=512,
        checkpoint_every_tokens=128 * 4,
        norm_sample_tokens=512,
        prefetch=0,
    )


RUN = RunSpec("topk", SAEConfig(arch="topk", d=D, n_latents=256, k=4), 3e-3)


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = SAE.load(a), SAE.load(b)
    return all(torch.equal(t, sb.state_dict()[k]) for k, t in sa.state_dict().items())


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


def test_training_on_a_full_disk_fails_in_one_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected ENOSPC at the second checkpoint: one-line error, no temporary files, the
    first checkpoint intact; running again resumes from it to the reference weights."""
    small_store(tmp_path / "store")
    ref = train(config(tmp_path / "store", tmp_path / "ref"), [RUN], progress=False)
    out = tmp_path / "out"
    real = atomic.write_file
    checkpoints = []

    def full_at_second_checkpoint(final: Path, write):  # type: ignore[no-untyped-def]
        if Path(final).name == "optimizer.safetensors":
            checkpoints.append(final)
            if len(checkpoints) == 2:

                def no_space(_: object) -> None:
                    raise OSError(errno.ENOSPC, "No space left on device")

                return real(final, no_space)
        return real(final, write)

    monkeypatch.setattr(atomic, "write_file", full_at_second_checkpoint)
    with pytest.raises(VisaeError, match=r"^disk full while writing .*optimizer\.safetensors$"):
        train(config(tmp_path / "store", out), [RUN], progress=False)
    monkeypatch.undo()
    assert leftovers(out) == []
    assert (out / "checkpoint" / "state.json").is_file()  # the first checkpoint, whole
    finals = train(config(tmp_path / "store", out), [RUN], progress=False)
    assert same_weights(ref["topk"], finals["topk"])


def can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(where)]).returncode
    return ok == 0


def test_training_on_a_real_full_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    if not can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC test covers it")
    try:
        small_store(tmp_path / "store")
        ref = train(config(tmp_path / "store", tmp_path / "ref"), [RUN], progress=False)
        out = mnt / "out"
        with pytest.raises(VisaeError, match=r"^disk full while writing .*out") as info:
            train(config(tmp_path / "store", out), [RUN], progress=False)
        assert "\n" not in str(info.value)
        assert leftovers(out) == []
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        finals = train(config(tmp_path / "store", out), [RUN], progress=False)
        assert same_weights(ref["topk"], finals["topk"])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
