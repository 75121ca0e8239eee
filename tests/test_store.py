"""Activation store: format, atomic + resumable writing (real SIGKILLs, real ENOSPC),
refusals, verification, readers, and extraction with a tiny random DINOv2."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from visae.backbones.base import Backbone, TokenLayout
from visae.errors import VisaeError
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, extract

SRC = Path(__file__).resolve().parents[1] / "src"

# layer 2: ViT-like (1 CLS, 2 registers, 2x3 patches); layer 5: CNN-like (2x2 grid, no CLS)
LAYOUT_VIT = {"n_cls": 1, "n_registers": 2, "grid": [2, 3]}
LAYOUT_CNN = {"n_cls": 0, "n_registers": 0, "grid": [2, 2]}
SIZES = [4, 4, 4, 3]


def make_spec(**changes: Any) -> StoreSpec:
    fields: dict[str, Any] = {
        "backbone": {"name": "toy", "weights_hash": "abc123", "preprocessing": {"size": 16}},
        "dataset": {"name": "toyset", "fingerprint": "fp-1"},
        "layers": [LayerSpec(2, 8, LAYOUT_VIT), LayerSpec(5, 6, LAYOUT_CNN)],
        "dtype": "float16",
        "tokens": "all",
        "shard_images": 4,
    }
    fields.update(changes)
    return StoreSpec(**fields)


def shard_data(
    spec: StoreSpec, shard: int, n: int, seed: int = 7
) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """Deterministic synthetic activations of one shard (seeded per shard, so a resumed
    writer produces the same arrays)."""
    rng = np.random.default_rng([seed, shard])
    acts = {
        e["layer"]: rng.standard_normal((n, e["n_tokens"], e["d"])).astype(np.float32)
        for e in spec.layer_entries
    }
    meta = [{"source": f"img{shard}_{i}", "labels": [f"c{i % 2}"]} for i in range(n)]
    return acts, meta


def write_store(
    path: Path, spec: StoreSpec, sizes: Sequence[int] = SIZES, finish: bool = True
) -> dict[int, np.ndarray]:
    """Write a store; returns the concatenated input arrays per layer."""
    parts: dict[int, list[np.ndarray]] = {e["layer"]: [] for e in spec.layer_entries}
    with StoreWriter(path, spec) as w:
        for s in range(w.n_shards, len(sizes)):
            acts, meta = shard_data(spec, s, sizes[s])
            w.append_shard(acts, meta)
            for layer, a in acts.items():
                parts[layer].append(a)
        if finish:
            w.finish()
    return {layer: np.concatenate(p) for layer, p in parts.items() if p}


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, hidden ones included."""
    return {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, np.ndarray]]:
    path = tmp_path_factory.mktemp("ref") / "store"
    return path, write_store(path, make_spec())


# -- format ----------------------------------------------------------------------------------


def test_manifest_fields_checksums_and_deterministic_json(reference, tmp_path):
    path, _ = reference
    text = (path / "manifest.json").read_text(encoding="utf-8")
    m = json.loads(text)
    assert text == json.dumps(m, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert m["schema_version"] == 1 and m["complete"] is True
    assert m["backbone"] == {"name": "toy", "weights_hash": "abc123", "preprocessing": {"size": 16}}
    assert m["dataset"] == {"name": "toyset", "fingerprint": "fp-1"}
    assert (m["dtype"], m["tokens"], m["shard_images"], m["n_images"]) == ("float16", "all", 4, 15)
    assert [s["images"] for s in m["shards"]] == SIZES
    assert [s["first_image"] for s in m["shards"]] == [0, 4, 8, 12]
    assert m["skipped"] == []
    vit, cnn = m["layers"]
    assert (vit["layer"], vit["d"], vit["n_tokens"], vit["dir"]) == (2, 8, 9, "layer_02")
    assert vit["kinds"] == [["cls", 1], ["register", 2], ["patch", 6]]
    assert (cnn["layer"], cnn["d"], cnn["kinds"]) == (5, 6, [["patch", 4]])
    for shard in m["shards"]:
        assert sorted(shard["files"]) == [
            f"layer_02/shard_{shard['index']:05d}.npy",
            f"layer_05/shard_{shard['index']:05d}.npy",
            f"metadata/shard_{shard['index']:05d}.jsonl",
        ]
        for rel, info in shard["files"].items():
            data = (path / rel).read_bytes()
            assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    arr = np.load(path / "layer_02/shard_00003.npy")
    assert arr.shape == (3, 9, 8) and arr.dtype == np.float16
    assert not any(k in text.lower() for k in ("time", "date", "created"))
    # a second, independent write is byte-identical
    write_store(tmp_path / "again", make_spec())
    assert tree_hashes(tmp_path / "again") == tree_hashes(path)


def test_ordered_get_metadata_and_token_filters(reference):
    path, inputs = reference
    store = ActivationStore.open(path)
    assert store.layers == [2, 5] and store.n_images == 15 and store.dtype == "float16"
    assert store.d(2) == 8 and store.d(5) == 6
    assert store.layout(2).n_special == 3 and store.layout(5).grid == (2, 2)
    assert store.kinds(2) == ["cls", "register", "register"] + ["patch"] * 6
    assert store.token_positions(2, "patch").tolist() == [3, 4, 5, 6, 7, 8]
    assert store.token_positions(2, "cls").tolist() == [0]
    assert store.token_positions(5, "all").tolist() == [0, 1, 2, 3]
    assert store.n_tokens(2, "patch") == 15 * 6
    with pytest.raises(VisaeError, match="no CLS token at layer 5"):
        store.token_positions(5, "cls")
    with pytest.raises(VisaeError, match="layer 3 is not in the store"):
        store.d(3)
    for layer in (2, 5):
        want = inputs[layer].astype(np.float16).astype(np.float32)
        for tokens in ("all", "patch") + (("cls",) if layer == 2 else ()):
            pos = store.token_positions(layer, tokens)
            ids, acts = zip(*store.ordered(layer, tokens, batch_images=3), strict=True)
            assert [len(i) for i in ids] == [3, 3, 3, 3, 3]  # batches cross shard borders
            assert np.concatenate(ids).tolist() == list(range(15))
            got = np.concatenate(acts)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want[:, pos])
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, token = int(rng.integers(15)), int(rng.integers(9))
        got = store.get(2, image, token)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want_ := inputs[2][image, token].astype(np.float16))
        assert want_.shape == (8,)
    with pytest.raises(VisaeError, match="image 15 is out of range"):
        store.get(2, 15, 0)
    meta = store.metadata()
    assert [m["source"] for m in meta] == [
        f"img{s}_{i}" for s, n in enumerate(SIZES) for i in range(n)
    ]
    ident = store.identity()
    assert ident["weights_hash"] == "abc123" and ident["dataset_fingerprint"] == "fp-1"
    assert ident["layers"]["5"]["d"] == 6


def test_float32_and_token_choice_stores(tmp_path):
    spec32 = make_spec(dtype="float32")
    inputs = write_store(tmp_path / "f32", spec32)
    store = ActivationStore.open(tmp_path / "f32")
    got = np.concatenate([a for _, a in store.ordered(2)])
    np.testing.assert_array_equal(got, inputs[2])  # float32 is exact

    spec_patch = make_spec(tokens="patch")
    assert [e["n_tokens"] for e in spec_patch.layer_entries] == [6, 4]
    acts, meta = shard_data(spec_patch, 0, 2)
    with StoreWriter(tmp_path / "patch", spec_patch) as w:
        w.append_shard(acts, meta)
        w.finish()
    store = ActivationStore.open(tmp_path / "patch")
    assert store.tokens == "patch" and store.layout(2).n_special == 0
    assert store.layout(2).grid == (2, 3)
    assert store.token_positions(2, "all").tolist() == store.token_positions(2, "patch").tolist()
    with pytest.raises(VisaeError, match="no CLS token"):
        store.token_positions(2, "cls")

    with pytest.raises(VisaeError, match="layer 5: tokens='cls' asked of a layer without a CLS"):
        make_spec(tokens="cls")
    spec_cls = make_spec(tokens="cls", layers=[LayerSpec(2, 8, LAYOUT_VIT)])
    assert spec_cls.layer_entries[0]["n_tokens"] == 1
    with pytest.raises(VisaeError, match=r"expected \[2, 1, 8\]"):
        StoreWriter(tmp_path / "cls", spec_cls).append_shard(
            {2: np.zeros((2, 9, 8), np.float32)}, meta
        )


def test_summary(reference):
    text = ActivationStore.open(reference[0]).summary()
    for needle in (
        "backbone     toy",
        "dataset      toyset",
        "images       15 in 4 shards",
        "skipped      0",
        "tokens       all",
        "dtype        float16",
        "layer 2      d=8  9 tokens (1 cls + 2 registers + 2x3 patches)",
        "layer 5      d=6  4 tokens (2x2 patches)",
        "complete     yes",
        "size ",
    ):
        assert needle in text, needle


# -- refusals, verification, completeness -------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"backbone": {"name": "toy", "weights_hash": "zzz", "preprocessing": {"size": 16}}},
            "backbone weights_hash",
        ),
        (
            {
                "backbone": {
                    "name": "other",
                    "weights_hash": "abc123",
                    "preprocessing": {"size": 16},
                }
            },
            "backbone name",
        ),
        (
            {"backbone": {"name": "toy", "weights_hash": "abc123", "preprocessing": {"size": 32}}},
            "preprocessing",
        ),
        ({"dataset": {"name": "toyset", "fingerprint": "fp-2"}}, "dataset fingerprint"),
        ({"layers": [LayerSpec(2, 8, LAYOUT_VIT)]}, "layers"),
        ({"layers": [LayerSpec(3, 8, LAYOUT_VIT), LayerSpec(5, 6, LAYOUT_CNN)]}, "layers"),
        (
            {"layers": [LayerSpec(2, 16, LAYOUT_VIT), LayerSpec(5, 6, LAYOUT_CNN)]},
            "layer 2 width d",
        ),
        (
            {
                "layers": [
                    LayerSpec(2, 8, LAYOUT_VIT),
                    LayerSpec(5, 6, {**LAYOUT_CNN, "grid": [4, 1]}),
                ]
            },
            "layer 5 token layout",
        ),
        ({"dtype": "float32"}, "dtype"),
        ({"tokens": "patch"}, "tokens"),
        ({"shard_images": 8}, "shard_images"),
    ],
)
def test_resume_refuses_other_spec(tmp_path, changes, field):
    write_store(tmp_path / "s", make_spec(), sizes=[4], finish=False)
    before = tree_hashes(tmp_path / "s")
    with pytest.raises(VisaeError) as err:
        StoreWriter(tmp_path / "s", make_spec(**changes))
    msg = str(err.value)
    assert "\n" not in msg and f"differs in {field}" in msg
    assert tree_hashes(tmp_path / "s") == before


def test_complete_store_resume_is_noop(reference, tmp_path):
    path, _ = reference
    before = tree_hashes(path)
    with StoreWriter(path, make_spec()) as w:
        assert w.complete and w.resumed and w.n_images == 15
        with pytest.raises(VisaeError, match="is complete; nothing can be appended"):
            w.append_shard(*shard_data(make_spec(), 4, 1))
        w.finish()
    assert tree_hashes(path) == before


def test_incomplete_store_needs_allow_incomplete(tmp_path):
    write_store(tmp_path / "s", make_spec(), sizes=[4, 4], finish=False)
    with pytest.raises(VisaeError, match=r"is incomplete .*resume it by running the same"):
        ActivationStore.open(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert store.n_images == 8 and not store.complete
    assert "complete     no (resumable)" in store.summary()


def test_verify_reports_damaged_file_by_name(reference, tmp_path):
    src, _ = reference
    path = tmp_path / "s"
    subprocess.run(["cp", "-a", str(src), str(path)], check=True)
    shard = path / "layer_05/shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(VisaeError, match=r"checksum mismatch in layer_05/shard_00001\.npy"):
        ActivationStore.open(path)
    ActivationStore.open(path, verify=False)  # fast path: sizes only
    shard.write_bytes(bytes(data[:-10]))
    for verify in (True, False):
        with pytest.raises(VisaeError, match=r"layer_05/shard_00001\.npy is truncated"):
            ActivationStore.open(path, verify=verify)
    (path / "metadata/shard_00002.jsonl").unlink()
    shard.write_bytes(bytes(data))
    with pytest.raises(VisaeError, match=r"metadata/shard_00002\.jsonl is missing"):
        ActivationStore.open(path, verify=False)


def test_not_a_store_and_lock(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(VisaeError, match="not a visae store"):
        StoreWriter(tmp_path / "junk", make_spec())
    with pytest.raises(VisaeError, match="not a visae activation store"):
        ActivationStore.open(tmp_path / "junk")
    with (
        StoreWriter(tmp_path / "s", make_spec()),
        pytest.raises(VisaeError, match="being written by another writer"),
    ):
        StoreWriter(tmp_path / "s", make_spec())
    StoreWriter(tmp_path / "s", make_spec()).close()  # lock released


def test_nonfinite_refused_with_image_and_source(tmp_path):
    spec = make_spec()
    with StoreWriter(tmp_path / "s", spec) as w:
        w.append_shard(*shard_data(spec, 0, 4))
        acts, meta = shard_data(spec, 1, 4)
        acts[5][2, 1, 3] = np.nan
        with pytest.raises(
            VisaeError,
            match=r"layer 5: non-finite activations \(NaN/inf\) in image 6 \(source: img1_2\)",
        ):
            w.append_shard(acts, meta)
        acts[5][2, 1, 3] = 0.0
        acts[2][3, 0, 0] = 1e6  # finite in float32, inf in float16
        with pytest.raises(
            VisaeError, match=r"beyond the float16 range .* in image 7 \(source: img1_3\)"
        ):
            w.append_shard(acts, meta)
        assert w.n_shards == 1
    assert not (tmp_path / "s/layer_02/shard_00001.npy").exists()
    assert sorted(p.name for p in (tmp_path / "s/layer_02").iterdir()) == ["shard_00000.npy"]

    with StoreWriter(tmp_path / "s", spec, allow_nonfinite=True) as w:
        w.append_shard(acts, meta)
        w.finish()
    store = ActivationStore.open(tmp_path / "s")
    assert store.manifest["shards"][1]["nonfinite"] == [
        {"image": 7, "layer": 2, "source": "img1_3"}
    ]
    assert np.isinf(store.get(2, 7, 0)[0])
    assert "non-finite   1" in store.summary()


def test_disk_full_dev_full(reference, tmp_path):
    """Real ENOSPC from the kernel: the temporary name the writer is about to use is a
    symlink to /dev/full, so the write goes through the real code path and fails."""
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available")
    spec = make_spec()
    path = tmp_path / "s"
    with StoreWriter(path, spec) as w:
        w.append_shard(*shard_data(spec, 0, 4))
        (path / "layer_05/.shard_00001.npy.tmp").symlink_to("/dev/full")
        with pytest.raises(VisaeError) as err:
            w.append_shard(*shard_data(spec, 1, 4))
        assert str(err.value) == f"disk full while writing {path / 'layer_05/shard_00001.npy'}"
        assert not (path / "layer_05/.shard_00001.npy.tmp").is_symlink()
        assert ActivationStore.open(path, allow_incomplete=True).n_images == 4
        # the manifest itself hits the full disk: shard files are renamed but not listed
        (path / ".manifest.json.tmp").symlink_to("/dev/full")
        with pytest.raises(VisaeError, match=r"^disk full while writing .*manifest\.json$"):
            w.append_shard(*shard_data(spec, 1, 4))
    store = ActivationStore.open(path, allow_incomplete=True)
    assert store.n_images == 4 and json.loads((path / "manifest.json").read_text())
    write_store(path, spec)  # resume after the disk has room again
    assert tree_hashes(path) == tree_hashes(reference[0])


def test_disk_full_tmpfs(reference, tmp_path):
    """A real small filesystem that fills up mid-store (needs permission to mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        spec = make_spec(shard_images=64, layers=[LayerSpec(2, 64, LAYOUT_VIT)])
        with StoreWriter(mnt / "s", spec) as w, pytest.raises(VisaeError) as err:
            for s in range(100):
                w.append_shard(*shard_data(spec, s, 16))
        assert str(err.value).startswith("disk full while writing ")
        assert "\n" not in str(err.value)
        kept = ActivationStore.open(mnt / "s", allow_incomplete=True)  # listed files intact
        assert kept.n_shards >= 1
        assert not [p for p in (mnt / "s").rglob(".*.tmp")]
        subprocess.run(["cp", "-a", str(mnt / "s"), str(tmp_path / "moved")], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    n = kept.n_shards + 2
    with StoreWriter(tmp_path / "moved", spec) as w:
        for s in range(w.n_shards, n):
            w.append_shard(*shard_data(spec, s, 16))
        w.finish()
    with StoreWriter(tmp_path / "direct", spec) as w:
        for s in range(n):
            w.append_shard(*shard_data(spec, s, 16))
        w.finish()
    assert tree_hashes(tmp_path / "moved") == tree_hashes(tmp_path / "direct")


# -- kills ---------------------------------------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from visae.store import LayerSpec, StoreSpec, StoreWriter

    path, n_shards, n_images, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    crash = os.environ.get("VISAE_TEST_CRASH")  # "<n>:before" | "<n>:after" the n-th os.replace
    calls = [0]
    real_replace = os.replace

    def replace(*args, **kwargs):
        calls[0] += 1
        if crash == f"{calls[0]}:before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(*args, **kwargs)
        if crash == f"{calls[0]}:after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    layout = {"n_cls": 1, "n_registers": 0, "grid": [2, 2]}
    spec = StoreSpec(
        backbone={"name": "toy", "weights_hash": "w", "preprocessing": {}},
        dataset={"name": "toyset", "fingerprint": "f"},
        layers=[LayerSpec(0, d, layout), LayerSpec(3, d, layout)],
        shard_images=n_images,
    )
    with StoreWriter(path, spec) as w:
        for s in range(w.n_shards, n_shards):
            rng = np.random.default_rng([11, s])
            acts = {L: rng.standard_normal((n_images, 5, d)).astype(np.float32) for L in (0, 3)}
            w.append_shard(acts, [{"source": f"s{s}/{i}"} for i in range(n_images)])
        w.finish()
    print(calls[0])
    """
)


def run_writer(script: Path, path: Path, args: Sequence[int], crash: str | None = None) -> Any:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("VISAE_TEST_CRASH", None)
    if crash:
        env["VISAE_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, str(script), str(path), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
    )


def check_consistent_after_kill(path: Path) -> None:
    """Whatever the kill point, the manifest (if any) lists only whole, correct files."""
    if (path / "manifest.json").exists():
        ActivationStore.open(path, verify=True, allow_incomplete=True)


def check_resume_cleans(path: Path, tmp: Path) -> None:
    """Resuming a copy of a killed store and finishing it at once leaves exactly the files
    the manifest lists: temporary files and unlisted shards are removed."""
    if not (path / "manifest.json").exists():
        return
    subprocess.run(["cp", "-a", str(path), str(tmp)], check=True)
    manifest = json.loads((tmp / "manifest.json").read_text())
    with StoreWriter(tmp, StoreSpec.from_manifest(manifest)) as w:
        w.finish()
    listed = {rel for shard in w.manifest["shards"] for rel in shard["files"]}
    files = {f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file()}
    assert files == listed | {"manifest.json"}
    ActivationStore.open(tmp)


@pytest.mark.slow
def test_sigkill_at_every_commit_point_resumes_byte_identical(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    args = (3, 4, 8)
    ref = tmp_path / "ref"
    res = run_writer(script, ref, args)
    assert res.returncode == 0, res.stderr
    n_replace = int(res.stdout.strip())
    assert (
        n_replace == 1 + 3 * (2 + 1 + 1) + 1
    )  # first manifest, shards x (layers+meta+manifest), finish
    want = tree_hashes(ref)
    for n in range(1, n_replace + 1):
        for when in ("before", "after"):
            path = tmp_path / f"kill_{n}_{when}"
            res = run_writer(script, path, args, crash=f"{n}:{when}")
            assert res.returncode == -signal.SIGKILL, (n, when, res.stderr)
            check_consistent_after_kill(path)
            check_resume_cleans(path, tmp_path / f"finished_{n}_{when}")
            res = run_writer(script, path, args)  # resume in a fresh process
            assert res.returncode == 0, (n, when, res.stderr)
            assert tree_hashes(path) == want, (n, when)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_byte_identical(tmp_path):
    """Kills by a timer at random moments (mid-write included), resumed runs killed too;
    after 6 kills a run may finish, so a loaded machine cannot make the test loop."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    args = (12, 64, 512)  # ~0.3 MiB per layer per shard: the kills land inside writes
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    assert run_writer(script, ref, args).returncode == 0
    duration = time.perf_counter() - t0
    want = tree_hashes(ref)
    rng = np.random.default_rng(1)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    total_kills = 0
    for trial in range(4):
        path = tmp_path / f"random_{trial}"
        kills = 0
        while True:
            proc = subprocess.Popen(
                [sys.executable, str(script), str(path), *map(str, args)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                proc.wait(timeout=float(rng.uniform(0.05, 0.9 * duration)) if kills < 6 else None)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            if proc.returncode == 0:
                break
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
            kills += 1
            check_consistent_after_kill(path)
        total_kills += kills
        assert tree_hashes(path) == want, trial
    assert total_kills >= 4


# -- shuffled reader -----------------------------------------------------------------------------


def tagged_store(path: Path, dtype: str, sizes: Sequence[int]) -> StoreSpec:
    """Every token's vector is [image, token, image, token]: exact in float16 and float32."""
    spec = make_spec(dtype=dtype, layers=[LayerSpec(2, 4, LAYOUT_VIT)], shard_images=max(sizes))
    first = 0
    with StoreWriter(path, spec) as w:
        for n in sizes:
            img = np.arange(first, first + n, dtype=np.float32)[:, None].repeat(9, 1)
            tok = np.arange(9, dtype=np.float32)[None, :].repeat(n, 0)
            acts = np.stack([img, tok, img, tok], axis=-1)
            w.append_shard({2: acts}, [{"source": str(first + i)} for i in range(n)])
            first += n
        w.finish()
    return spec


def token_ids(batches: list[np.ndarray]) -> list[tuple[int, int]]:
    allb = np.concatenate(batches)
    assert allb.dtype == np.float32
    assert np.array_equal(allb[:, :2], allb[:, 2:])
    return [(int(a), int(b)) for a, b in allb[:, :2]]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shuffled_every_token_exactly_once(tmp_path, dtype):
    sizes = [7, 7, 7, 5, 7, 3]
    tagged_store(tmp_path / "s", dtype, sizes)
    store = ActivationStore.open(tmp_path / "s")
    n_img = sum(sizes)
    for tokens, positions in (("patch", range(3, 9)), ("cls", [0]), ("all", range(9))):
        expected = sorted((i, t) for i in range(n_img) for t in positions)
        for batch, buffer_tokens in ((5, 10), (64, 100), (4096, 1 << 18), (13, 1)):
            batches = list(
                store.shuffled(2, tokens, batch_size=batch, seed=3, buffer_tokens=buffer_tokens)
            )
            assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch
            ids = token_ids(batches)
            assert sorted(ids) == expected, (tokens, batch, buffer_tokens)
            assert len(ids) == store.n_tokens(2, tokens)


def test_shuffled_image_subset_exactly_once(tmp_path):
    sizes = [7, 7, 7, 5, 7, 3]
    tagged_store(tmp_path / "s", "float16", sizes)
    store = ActivationStore.open(tmp_path / "s")
    for subset in ([0, 1, 2, 3, 4, 5, 6], [3, 9, 10, 30, 35], [35], []):
        batches = list(store.shuffled(2, "patch", batch_size=4, images=np.array(subset)))
        if not subset:
            assert batches == []
            continue
        assert sorted(token_ids(batches)) == sorted((i, t) for i in subset for t in range(3, 9))
    with pytest.raises(VisaeError, match="image indices"):
        list(store.shuffled(2, "patch", images=np.array([36])))


def test_ordered_image_subset(tmp_path):
    tagged_store(tmp_path / "s", "float32", [7, 7, 5])
    store = ActivationStore.open(tmp_path / "s")
    subset = np.array([18, 0, 6, 7, 13])
    batches = list(store.ordered(2, "all", batch_images=2, images=subset))
    ids = np.concatenate([i for i, _ in batches])
    acts = np.concatenate([a for _, a in batches])
    assert ids.tolist() == [0, 6, 7, 13, 18] and [len(i) for i, _ in batches] == [2, 2, 1]
    assert np.array_equal(acts[:, :, 0], np.repeat(ids[:, None], 9, 1))
    assert np.array_equal(acts[:, :, 1], np.tile(np.arange(9), (5, 1)))


def test_shuffled_seeds_epochs_prefetch_and_mixing(tmp_path):
    tagged_store(tmp_path / "s", "float16", [8] * 10)
    store = ActivationStore.open(tmp_path / "s")

    def order(**kw: Any) -> list[tuple[int, int]]:
        return token_ids(list(store.shuffled(2, "patch", batch_size=32, buffer_tokens=150, **kw)))

    base = order(seed=0, epoch=0, prefetch=0)
    assert order(seed=0, epoch=0, prefetch=2) == base
    assert order(seed=0, epoch=0, prefetch=1) == base
    assert order(seed=0, epoch=1) != base
    assert order(seed=1, epoch=0) != base
    assert sorted(order(seed=1, epoch=0)) == sorted(base)
    first = base[:32]
    shards = {img // 8 for img, _ in first}
    assert len(shards) >= 2  # a batch mixes several shards
    assert len({img for img, _ in first}) >= 10  # and many images
    assert first != sorted(first)


def test_shuffled_prefetch_thread_stops_when_abandoned(tmp_path):
    tagged_store(tmp_path / "s", "float16", [8] * 10)
    store = ActivationStore.open(tmp_path / "s")
    before = threading.active_count()
    it = store.shuffled(2, "patch", batch_size=4, buffer_tokens=10, prefetch=2)
    next(it)
    assert threading.active_count() == before + 1
    it.close()
    assert threading.active_count() == before


def test_readers_bound_open_files(tmp_path):
    """Maps of shards are not all kept open (each holds a file descriptor)."""
    tagged_store(tmp_path / "s", "float16", [1] * 80)
    store = ActivationStore.open(tmp_path / "s")
    fds = len(os.listdir("/proc/self/fd"))
    n = sum(len(b) for b in store.shuffled(2, "all", batch_size=7, prefetch=0))
    n += sum(len(ids) for ids, _ in store.ordered(2, batch_images=3))
    assert [int(store.get(2, i, 4)[0]) for i in range(80)] == list(range(80))
    assert n == 80 * 9 + 80
    assert len(os.listdir("/proc/self/fd")) - fds <= 40


# -- extraction with a tiny random DINOv2 --------------------------------------------------------


class TinyDino(Backbone):
    """A random 2-block Dinov2Model (structure test only): 16x16 images, 4x4 patches."""

    n_layers = 2

    def __init__(self, seed: int = 0) -> None:
        cfg = transformers.Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=4,
            image_size=16,
        )
        torch.manual_seed(seed)
        self.model = transformers.Dinov2Model(cfg).eval()
        self.name = "tiny-dinov2-random"

    def d(self, layer: int) -> int:
        return 32

    def layout(self, layer: int) -> TokenLayout:
        return TokenLayout(1, 0, (4, 4))

    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        arrs = [np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32) for im in images]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 255.0
        return (x - 0.5) / 0.5

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"resize": [16, 16], "mean": 0.5, "std": 0.5}

    @property
    def weights_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def module(self) -> Any:
        return self.model

    def _block(self, layer: int) -> Any:
        return self.model.encoder.layer[layer]

    def _run(self, pixels: Any) -> Any:
        return self.model(pixel_values=pixels)

    def _to_tokens(self, layer: int, output: Any) -> Any:
        return output[0] if isinstance(output, tuple) else output

    def _from_tokens(self, layer: int, output: Any, tokens: Any) -> Any:
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens


class FolderDataset:
    """An ImageFolder-like dataset of the PNG files in one directory."""

    name = "tiny-folder"

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.files[i]) as im:
            return im.convert("RGB")

    def metadata(self, i: int) -> dict[str, Any]:
        return {"source": self.files[i].name, "labels": [f"class{i % 3}"]}

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()


class InterruptedDataset(FolderDataset):
    """The same dataset, but the run is interrupted (Ctrl-C) when image `stop_at` is read."""

    def __init__(self, root: Path, stop_at: int) -> None:
        super().__init__(root)
        self.stop_at = stop_at

    def image(self, i: int) -> Image.Image:
        if i == self.stop_at:
            raise KeyboardInterrupt
        return super().image(i)


UNREADABLE = {3: "garbage", 7: "truncated"}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(11):
        f = root / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i, 18, 3), dtype=np.uint8)).save(f)
        if UNREADABLE.get(i) == "garbage":
            f.write_bytes(b"this is not an image at all")
        elif UNREADABLE.get(i) == "truncated":
            f.write_bytes(f.read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def extracted(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extract") / "store"
    extract(
        TinyDino(),
        FolderDataset(image_dir),
        out,
        [0, 1],
        batch_size=3,
        shard_images=4,
        progress=False,
    )
    return out


def test_extract_matches_direct_forward_and_skips_unreadable(extracted, image_dir, caplog):
    ds = FolderDataset(image_dir)
    store = ActivationStore.open(extracted)
    readable = [i for i in range(len(ds)) if i not in UNREADABLE]
    assert store.n_images == len(readable) and store.layers == [0, 1]
    assert [s["images"] for s in store.manifest["shards"]] == [3, 3, 3]
    assert [(s["index"], s["source"]) for s in store.skipped] == [
        (3, "img_003.png"),
        (7, "img_007.png"),
    ]
    assert all(s["reason"] and "\n" not in s["reason"] for s in store.skipped)
    meta = store.metadata()
    assert [m["dataset_index"] for m in meta] == readable
    assert [m["source"] for m in meta] == [ds.files[i].name for i in readable]
    assert meta[0]["labels"] == ["class0"]
    bb = TinyDino()
    assert store.backbone["weights_hash"] == bb.weights_hash
    assert store.dataset["fingerprint"] == ds.fingerprint
    assert store.layout(0) == TokenLayout(1, 0, (4, 4)) and store.d(1) == 32
    for k, i in enumerate(readable):
        ref = bb.record(bb.preprocess([ds.image(i)]), [0, 1])
        for layer in (0, 1):
            got = np.concatenate([a for _, a in store.ordered(layer)])[k]
            np.testing.assert_allclose(got, ref[layer][0].numpy(), rtol=2e-3, atol=2e-3)
    # the same run again is a no-op that says so
    before = tree_hashes(extracted)
    with caplog.at_level(logging.WARNING, logger="visae.store"):
        extract(bb, ds, extracted, [0, 1], batch_size=3, shard_images=4, progress=False)
    assert "already complete" in caplog.text
    assert tree_hashes(extracted) == before


def test_extract_skip_warns_and_fail_names_file(image_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="visae.store"):
        store = extract(
            TinyDino(),
            FolderDataset(image_dir),
            tmp_path / "a",
            [1],
            tokens="cls",
            dtype="float32",
            batch_size=4,
            shard_images=8,
            progress=False,
        )
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 2 and "img_003.png" in warnings[0] and "img_007.png" in warnings[1]
    assert all("\n" not in w for w in warnings)
    assert store.token_positions(1, "all").tolist() == [0] and store.dtype == "float32"
    with pytest.raises(VisaeError, match=r"cannot read image 3 \(img_003\.png\): "):
        extract(
            TinyDino(),
            FolderDataset(image_dir),
            tmp_path / "b",
            [0],
            on_unreadable="fail",
            batch_size=2,
            shard_images=2,
            progress=False,
        )
    partial = ActivationStore.open(tmp_path / "b", allow_incomplete=True)
    assert partial.n_images == 2 and not partial.complete


def test_extract_resumes_byte_identical_and_refuses_other_model(extracted, image_dir, tmp_path):
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        extract(
            TinyDino(),
            InterruptedDataset(image_dir, stop_at=9),
            out,
            [0, 1],
            batch_size=3,
            shard_images=4,
            progress=False,
        )
    assert ActivationStore.open(out, allow_incomplete=True).n_shards == 2
    with pytest.raises(VisaeError, match="differs in backbone weights_hash"):
        extract(
            TinyDino(seed=1),
            FolderDataset(image_dir),
            out,
            [0, 1],
            batch_size=3,
            shard_images=4,
            progress=False,
        )
    with pytest.raises(VisaeError, match="differs in layers"):
        extract(
            TinyDino(),
            FolderDataset(image_dir),
            out,
            [1],
            batch_size=3,
            shard_images=4,
            progress=False,
        )
    with pytest.raises(VisaeError, match="differs in tokens"):
        extract(
            TinyDino(),
            FolderDataset(image_dir),
            out,
            [0, 1],
            tokens="patch",
            batch_size=3,
            shard_images=4,
            progress=False,
        )
    store = extract(
        TinyDino(),
        FolderDataset(image_dir),
        out,
        [0, 1],
        batch_size=3,
        shard_images=4,
        progress=False,
    )
    assert store.complete
    assert tree_hashes(out) == tree_hashes(extracted)
    with pytest.raises(VisaeError, match="layer 2 is out of range for tiny-dinov2-random"):
        extract(TinyDino(), FolderDataset(image_dir), tmp_path / "c", [2], progress=False)


def test_extract_with_load_backbone_and_registers(image_dir, tmp_path):
    """The real `load_backbone` on a local tiny random DINOv2-with-registers directory."""
    from visae.backbones import load_backbone

    cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=4,
        image_size=16,
        num_register_tokens=2,
    )
    torch.manual_seed(0)
    transformers.Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path / "model")
    bb = load_backbone(str(tmp_path / "model"))
    ds = FolderDataset(image_dir)
    kw: dict[str, Any] = {"batch_size": 4, "shard_images": 8, "progress": False}
    full = extract(bb, ds, tmp_path / "all", [1], **kw)
    patch = extract(bb, ds, tmp_path / "patch", [1], tokens="patch", **kw)
    assert full.kinds(1) == ["cls", "register", "register"] + ["patch"] * 16
    assert full.manifest["backbone"]["preprocessing"] == bb.preprocessing
    assert patch.layout(1) == TokenLayout(0, 0, (4, 4))
    assert patch.manifest["layers"][0]["model_layout"]["n_registers"] == 2
    all_patch = np.concatenate([a for _, a in full.ordered(1, "patch")])
    np.testing.assert_array_equal(np.concatenate([a for _, a in patch.ordered(1)]), all_patch)
    ref = bb.record(bb.preprocess([ds.image(0), ds.image(1)]), [1])[1].numpy()
    np.testing.assert_allclose(
        np.concatenate([a for _, a in full.ordered(1)])[:2], ref, rtol=2e-3, atol=2e-3
    )
