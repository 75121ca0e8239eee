"""Activation store: format, atomic + resumable writing (real SIGKILLs, a full disk),
refusals, and verification once per change (see test_store_reader.py for the readers,
test_store_extract.py for extraction)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from store_helpers import (
    LAYOUT_CNN,
    LAYOUT_VIT,
    SIZES,
    make_spec,
    shard_data,
    tree_hashes,
    write_store,
)
from system_deps import require

import visae.store.reader as reader_module
from visae.atomic import HashingWriter
from visae.errors import VisaeError
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter
from visae.store.checks import checks_file
from visae.store.format import dumps_json

SRC = Path(__file__).resolve().parents[1] / "src"


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
    assert m["autocast"] is None
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
        assert got.dtype == np.float32 and got.shape == (8,)
        np.testing.assert_array_equal(got, inputs[2][image, token].astype(np.float16))
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
    assert store.token_positions(2, "all").tolist() == list(range(6))
    assert store.token_positions(2, "patch").tolist() == list(range(6))
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
        "autocast     none (full precision)",
        "dataset spec (none recorded)",
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
        ({"autocast": "bf16"}, "autocast"),
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


def test_resume_keeps_the_recorded_dataset_spec_and_reads_older_manifests(tmp_path):
    """A dataset spec says where the images are, not what they are: resuming with the same
    images found elsewhere goes on, keeping the spec the store was started with. A manifest
    written before `autocast` existed resumes as full precision."""
    here = make_spec(dataset={"name": "toyset", "fingerprint": "fp-1", "spec": "imagefolder:/a"})
    there = make_spec(dataset={"name": "toyset", "fingerprint": "fp-1", "spec": "imagefolder:/b"})
    write_store(tmp_path / "s", here, sizes=SIZES[:1], finish=False)
    write_store(tmp_path / "s", there)
    store = ActivationStore.open(tmp_path / "s")
    assert store.dataset_spec == "imagefolder:/a" and store.n_images == 15
    write_store(tmp_path / "one-go", here)
    assert tree_hashes(tmp_path / "s") == tree_hashes(tmp_path / "one-go")

    old = tmp_path / "old"
    write_store(old, make_spec(), sizes=SIZES[:1], finish=False)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["autocast"]
    (old / "manifest.json").write_text(dumps_json(manifest))
    with pytest.raises(VisaeError, match=r"differs in autocast \(store: null, requested: fp16\)"):
        StoreWriter(old, make_spec(autocast="fp16"))
    write_store(old, make_spec())
    assert ActivationStore.open(old).autocast is None
    assert "autocast" not in json.loads((old / "manifest.json").read_text())


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
    for verify in (True, "cached"):
        with pytest.raises(VisaeError, match=r"checksum mismatch in layer_05/shard_00001\.npy"):
            ActivationStore.open(path, verify=verify)
    ActivationStore.open(path, verify=False)  # fast path: sizes only
    shard.write_bytes(bytes(data[:-10]))
    for verify in (True, False, "cached"):
        with pytest.raises(VisaeError, match=r"layer_05/shard_00001\.npy is truncated"):
            ActivationStore.open(path, verify=verify)
    (path / "metadata/shard_00002.jsonl").unlink()
    shard.write_bytes(bytes(data))
    with pytest.raises(VisaeError, match=r"metadata/shard_00002\.jsonl is missing"):
        ActivationStore.open(path, verify=False)
    with pytest.raises(VisaeError, match="verify must be True, False or 'cached', not 'yes'"):
        ActivationStore.open(path, verify="yes")


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files the reader hashes, in order."""
    seen: list[str] = []
    real = reader_module.sha256_file

    def counting(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(reader_module, "sha256_file", counting)
    return seen


def test_store_is_hashed_once_and_again_only_where_it_changed(tmp_path, hashes):
    path = tmp_path / "s"
    write_store(path, make_spec())
    n_files = 3 * len(SIZES)
    ActivationStore.open(path)  # the writer recorded what it wrote: nothing to hash
    assert hashes == []
    checks_file(path).unlink()  # e.g. a store copied from elsewhere
    ActivationStore.open(path)
    ActivationStore.open(path)
    assert len(hashes) == n_files  # opening twice hashes once
    ActivationStore.open(path, verify=True)
    assert len(hashes) == 2 * n_files

    shard = path / "layer_02/shard_00002.npy"
    good = shard.read_bytes()
    before = shard.stat()
    bad = bytearray(good)
    bad[-3] ^= 0x10
    shard.write_bytes(bytes(bad))  # same size, new mtime
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    del hashes[:]
    with pytest.raises(VisaeError, match=r"checksum mismatch in layer_02/shard_00002\.npy"):
        ActivationStore.open(path)
    assert hashes == ["shard_00002.npy"]  # only the changed file was hashed

    # damage that keeps size and mtime passes the cached check; a full check finds it
    shard.write_bytes(good)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    ActivationStore.open(path)
    shard.write_bytes(bytes(bad))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    ActivationStore.open(path)
    with pytest.raises(VisaeError, match=r"checksum mismatch in layer_02/shard_00002\.npy"):
        ActivationStore.open(path, verify=True)
    # a file replaced by another (new inode) with the same size and mtime is hashed again
    other = shard.with_name("replacement")
    other.write_bytes(bytes(bad))
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, shard)
    with pytest.raises(VisaeError, match=r"checksum mismatch in layer_02/shard_00002\.npy"):
        ActivationStore.open(path)


def test_check_record_lives_outside_the_store_and_may_be_unwritable(tmp_path, hashes, monkeypatch):
    path = tmp_path / "s"
    write_store(path, make_spec())
    assert checks_file(path).is_file() and path not in checks_file(path).parents
    (tmp_path / "not-a-dir").write_text("x")
    monkeypatch.setenv("VISAE_CACHE", str(tmp_path / "not-a-dir"))
    ActivationStore.open(path)
    ActivationStore.open(path)  # nothing could be recorded: each open hashes, none fails
    assert len(hashes) == 2 * 3 * len(SIZES)


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
    require(os.path.exists("/dev/full"), "/dev/full")
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


def test_disk_full_on_a_small_filesystem(reference, tmp_path, monkeypatch):
    """A small filesystem that fills up mid-store: a real 64 KiB tmpfs where the test may
    mount one (root), else the same through a write that fails with ENOSPC past 64 KiB."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        room = [64 * 1024]
        real_write = HashingWriter.write

        def write(self: HashingWriter, data: bytes | memoryview) -> int:
            if len(data) > room[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= len(data)
            return real_write(self, data)

        monkeypatch.setattr(HashingWriter, "write", write)
    spec = make_spec(shard_images=64, layers=[LayerSpec(2, 64, LAYOUT_VIT)])
    try:
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
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        else:
            monkeypatch.undo()
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
    # first manifest, shards x (layers + metadata + manifest), finish, and the verification
    # record (outside the store) when the writer closes
    assert n_replace == 1 + 3 * (2 + 1 + 1) + 1 + 1
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
