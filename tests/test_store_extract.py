"""Extraction with a tiny random DINOv2: the stored numbers, unreadable images, resuming,
reduced-precision forwards (autocast), and the dataset spec that reopens a store's images."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from store_helpers import tree_hashes

from visae.backbones.base import Backbone, TokenLayout
from visae.data import ImageFolder, load_dataset
from visae.errors import VisaeError
from visae.store import ActivationStore, StoreSpec, StoreWriter, extract, open_dataset
from visae.store.dataset import spec_from_name


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
    refusals = [
        (TinyDino(seed=1), [0, 1], {}, "differs in backbone weights_hash"),
        (TinyDino(), [1], {}, "differs in layers"),
        (TinyDino(), [0, 1], {"tokens": "patch"}, "differs in tokens"),
    ]
    for model, layers, kwargs, message in refusals:
        with pytest.raises(VisaeError, match=message):
            extract(
                model,
                FolderDataset(image_dir),
                out,
                layers,
                batch_size=3,
                shard_images=4,
                progress=False,
                **kwargs,
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


# -- reduced precision -----------------------------------------------------------------------


def _all_tokens(store: ActivationStore, layer: int) -> np.ndarray:
    return np.concatenate([a for _, a in store.ordered(layer)])


def test_autocast_extraction_is_close_recorded_and_must_match_to_resume(
    extracted, image_dir, tmp_path
):
    full = ActivationStore.open(extracted)
    kw: dict[str, Any] = {"batch_size": 3, "shard_images": 4, "progress": False}
    for autocast, tol in (("bf16", 0.05), ("fp16", 0.01)):
        store = extract(
            TinyDino(),
            FolderDataset(image_dir),
            tmp_path / autocast,
            [0, 1],
            autocast=autocast,
            **kw,
        )
        assert store.autocast == autocast and store.dtype == "float16"
        assert f"autocast     {autocast}" in store.summary()
        assert store.identity()["autocast"] == autocast
        for layer in (0, 1):
            got, ref = _all_tokens(store, layer), _all_tokens(full, layer)
            rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            assert 0 < rel < tol, (autocast, layer, rel)  # reduced precision, really used
    assert full.autocast is None and "autocast" not in full.identity()

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        extract(TinyDino(), InterruptedDataset(image_dir, 9), out, [0, 1], autocast="bf16", **kw)
    with pytest.raises(VisaeError, match=r"differs in autocast \(store: bf16, requested: null\)"):
        extract(TinyDino(), FolderDataset(image_dir), out, [0, 1], **kw)
    extract(TinyDino(), FolderDataset(image_dir), out, [0, 1], autocast="bf16", **kw)
    assert tree_hashes(out) == tree_hashes(tmp_path / "bf16")
    with pytest.raises(VisaeError, match="autocast must be one of bf16, fp16 or None, not 'int8'"):
        extract(TinyDino(), FolderDataset(image_dir), tmp_path / "x", [0], autocast="int8", **kw)


# -- the dataset behind a store --------------------------------------------------------------


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding an ImageFolder `imgs/` of 8 images in 2 classes."""
    rng = np.random.default_rng(3)
    for i in range(8):
        folder = tmp_path / "work" / "imgs" / ("ab"[i // 4])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def test_a_store_reopens_its_images_from_any_directory(work, monkeypatch):
    kw: dict[str, Any] = {"batch_size": 4, "shard_images": 4, "progress": False}
    store = extract(TinyDino(), load_dataset("imgs#6"), "store", [1], **kw)
    assert store.dataset_spec == f"imagefolder:{(work / 'imgs').resolve()}#6"
    assert store.dataset["name"] == "imagefolder:imgs[6]"
    assert f"dataset spec {store.dataset_spec}" in store.summary()
    meta = store.metadata()
    assert meta[5]["source"] == "b/5.png"  # relative to the folder, not to any cwd

    (work.parent / "elsewhere").mkdir()
    monkeypatch.chdir(work.parent / "elsewhere")
    reopened = open_dataset(ActivationStore.open(work / "store"))
    assert len(reopened) == 6 and reopened.fingerprint == store.dataset["fingerprint"]
    for m in meta:
        with Image.open(work / "imgs" / m["source"]) as im:
            want = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(reopened.image(m["dataset_index"])), want)

    other = f"imagefolder:{work / 'imgs'}#5"
    with pytest.raises(VisaeError, match=r"dataset '.*#5' is not the one store .* extracted from"):
        open_dataset(store, spec=other)
    with pytest.raises(VisaeError, match=r"^dataset folder ./nowhere does not exist$"):
        open_dataset(store, spec="./nowhere")
    # a store that lost images: the same images, but not as many as the store read
    ds = load_dataset(f"imagefolder:{work / 'imgs'}")
    spec = StoreSpec.from_manifest(store.manifest)
    lost = StoreSpec(
        backbone=spec.backbone,
        dataset={"name": ds.name, "fingerprint": ds.fingerprint, "spec": ds.spec},
        layers=spec.layers,
        shard_images=4,
    )
    with StoreWriter(work / "short", lost) as w:
        w.append_shard({1: np.zeros((3, 17, 32), np.float32)}, [{"source": "x"}] * 3)
        w.finish()
    with pytest.raises(VisaeError, match=r"dataset 'imagefolder:.*imgs' has 8 images; store"):
        open_dataset(ActivationStore.open(work / "short"))


def test_stores_without_a_spec_reopen_where_their_name_is_one(work, monkeypatch):
    """Stores written before specs were recorded: their dataset name is tried as a spec (a
    subset's name `parent[N]` as `parent#N`), checked by fingerprint."""
    assert spec_from_name("scenes[400]") == "scenes#400"
    assert spec_from_name("scenes-shapes[8][3]") == "scenes:shapes#8#3"
    assert spec_from_name("skimage-photos") == "skimage"
    ds = ImageFolder("imgs")
    old = StoreSpec(
        backbone={"name": "toy", "weights_hash": "w", "preprocessing": {}},
        dataset={"name": "imgs", "fingerprint": ds.fingerprint},
        layers=StoreSpec.from_manifest(
            extract(TinyDino(), ds, "ref", [1], batch_size=8, progress=False).manifest
        ).layers,
        shard_images=8,
    )
    with StoreWriter("old", old) as w:
        w.append_shard({1: np.zeros((8, 17, 32), np.float32)}, [{"source": "x"}] * 8)
        w.finish()
    store = ActivationStore.open("old")
    assert store.dataset_spec is None and "dataset spec (none recorded)" in store.summary()
    assert open_dataset(store).fingerprint == ds.fingerprint  # from the folder it names
    monkeypatch.chdir(work / "imgs")
    with pytest.raises(VisaeError, match=r"records no dataset spec .* pass the dataset"):
        open_dataset(store)
    decoy = work.parent / "decoy"
    (decoy / "imgs").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(decoy / "imgs" / "0.png")
    monkeypatch.chdir(decoy)
    with pytest.raises(VisaeError, match=r"records no dataset spec .* opens other images"):
        open_dataset(store)
    assert len(open_dataset(store, spec=str(work / "imgs"))) == 8
