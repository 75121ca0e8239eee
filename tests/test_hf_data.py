"""Hugging Face datasets read from their files: folders written by the real `datasets` library
(save_to_disk, DatasetDict, hub-layout parquet), read back without it."""

from __future__ import annotations

import json
from pathlib import Path

import datasets as hf
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visae.data import HFDataset, load_dataset
from visae.errors import VisaeError

CLASSES = ["cat", "dog", "bird"]
TAGS = ["indoor", "outdoor", "night"]


def _pictures(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8) for i in range(n)]


def _dataset(pictures: list[np.ndarray], with_tags: bool = True) -> hf.Dataset:
    n = len(pictures)
    columns = {
        "image": [Image.fromarray(p) for p in pictures],
        "label": [i % 3 for i in range(n)],
        "caption": [f"picture {i}" for i in range(n)],
    }
    features = {
        "image": hf.Image(),
        "label": hf.ClassLabel(names=CLASSES),
        "caption": hf.Value("string"),
    }
    if with_tags:
        columns["tags"] = [[j for j in range(3) if (i >> j) & 1] for i in range(n)]
        features["tags"] = hf.Sequence(hf.ClassLabel(names=TAGS))
    return hf.Dataset.from_dict(columns, features=hf.Features(features))


def _pixels(dataset: HFDataset, i: int) -> np.ndarray:
    return np.asarray(dataset.image(i))


def test_save_to_disk_folder_round_trips_images_and_labels(tmp_path: Path) -> None:
    pictures = _pictures(5, seed=0)
    _dataset(pictures).save_to_disk(str(tmp_path / "ds"))
    ds = HFDataset(tmp_path / "ds")
    assert len(ds) == 5 and ds.image_column == "image"
    for i, picture in enumerate(pictures):
        np.testing.assert_array_equal(_pixels(ds, i), picture)
    # two label columns: names are prefixed by their column; list columns give every name
    assert ds.metadata(3)["labels"] == ["label=cat", "tags=indoor", "tags=outdoor"]
    assert ds.metadata(0)["labels"] == ["label=cat"]
    assert ds.metadata(4)["source"].endswith("#4")


def test_one_label_column_gives_bare_class_names(tmp_path: Path) -> None:
    _dataset(_pictures(4, seed=1), with_tags=False).save_to_disk(str(tmp_path / "ds"))
    ds = load_dataset(f"hf:{tmp_path / 'ds'}")
    assert [ds.metadata(i)["labels"] for i in range(4)] == [["cat"], ["dog"], ["bird"], ["cat"]]


def test_dataset_dict_splits(tmp_path: Path) -> None:
    train, test = _pictures(4, seed=2), _pictures(2, seed=3)
    hf.DatasetDict({"train": _dataset(train), "test": _dataset(test)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(load_dataset(f"hf:{tmp_path / 'dd'}")) == 4  # train by default
    ds = load_dataset(f"hf:{tmp_path / 'dd'}:test")
    assert len(ds) == 2
    np.testing.assert_array_equal(np.asarray(ds.image(1)), test[1])
    with pytest.raises(VisaeError, match=r"no split 'valid' \(splits: train, test\)"):
        load_dataset(f"hf:{tmp_path / 'dd'}:valid")
    _dataset(train).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(VisaeError, match="single dataset"):
        load_dataset(f"hf:{tmp_path / 'single'}:test")


def test_hub_layout_parquet_folder(tmp_path: Path) -> None:
    """The layout a hub dataset repo has (what a hub id downloads to)."""
    train, test = _pictures(6, seed=4), _pictures(3, seed=5)
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    _dataset(train[:4]).to_parquet(str(data / "train-00000-of-00002.parquet"))
    _dataset(train[4:]).to_parquet(str(data / "train-00001-of-00002.parquet"))
    _dataset(test).to_parquet(str(data / "test-00000-of-00001.parquet"))
    ds = load_dataset(f"hf:{tmp_path / 'repo'}")
    assert len(ds) == 6
    for i, picture in enumerate(train):
        np.testing.assert_array_equal(np.asarray(ds.image(i)), picture)
    assert ds.metadata(5)["labels"][0] == "label=dog"  # second row of the second shard
    assert len(load_dataset(f"hf:{tmp_path / 'repo'}:test#2")) == 2


def test_spec_names_the_folder_and_split_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, test = _pictures(3, seed=9), _pictures(2, seed=10)
    hf.DatasetDict({"train": _dataset(train), "test": _dataset(test)}).save_to_disk(
        str(tmp_path / "dd")
    )
    _dataset(train).save_to_disk(str(tmp_path / "single"))
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    specs = {
        "hf:dd": f"hf:{root / 'dd'}:train",  # the split chosen by default is named
        "hf:dd:test#1": f"hf:{root / 'dd'}:test#1",
        "hf:single": f"hf:{root / 'single'}",
    }
    opened = {given: load_dataset(given) for given in specs}
    assert {given: ds.spec for given, ds in opened.items()} == specs
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for ds in opened.values():
        again = load_dataset(str(ds.spec))
        assert (again.spec, len(again), again.fingerprint) == (ds.spec, len(ds), ds.fingerprint)
    np.testing.assert_array_equal(np.asarray(opened["hf:dd:test#1"].image(0)), test[0])
    assert HFDataset(tmp_path / "dd", image_column="image").spec is None  # no spec for a column


def test_fingerprint_follows_the_data(tmp_path: Path) -> None:
    pictures = _pictures(3, seed=6)
    _dataset(pictures).save_to_disk(str(tmp_path / "a"))
    _dataset(pictures).save_to_disk(str(tmp_path / "b"))
    pictures[1][0, 0, 0] ^= 1
    _dataset(pictures).save_to_disk(str(tmp_path / "c"))
    a, b, c = (HFDataset(tmp_path / name).fingerprint for name in "abc")
    assert a == b != c


def test_images_stored_by_path_and_schema_without_metadata(tmp_path: Path) -> None:
    picture = _pictures(1, seed=7)[0]
    Image.fromarray(picture).save(tmp_path / "p.png")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {"img": pa.array([{"bytes": None, "path": str(tmp_path / "p.png")}], type=struct)}
    )
    (tmp_path / "repo").mkdir()
    pq.write_table(table, tmp_path / "repo" / "train-00000-of-00001.parquet")
    ds = HFDataset(tmp_path / "repo")
    assert ds.image_column == "img" and ds.metadata(0)["labels"] == []
    np.testing.assert_array_equal(np.asarray(ds.image(0)), picture)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    hf.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(VisaeError, match="has no image column"):
        HFDataset(tmp_path / "text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisaeError, match="not a Hugging Face dataset"):
        HFDataset(tmp_path / "empty")
    with pytest.raises(VisaeError, match="does not exist"):
        load_dataset(f"hf:{tmp_path / 'missing' / 'deeper' / 'x'}")
    with pytest.raises(VisaeError, match="expected hf:"):
        load_dataset("hf:")
    _dataset(_pictures(2, seed=8)).save_to_disk(str(tmp_path / "broken"))
    state = json.loads((tmp_path / "broken" / "state.json").read_text())
    (tmp_path / "broken" / state["_data_files"][0]["filename"]).unlink()
    with pytest.raises(VisaeError, match="dataset file missing"):
        HFDataset(tmp_path / "broken")
    # a hub id goes to the hub; offline (conftest), the one-line error says which id and why
    with pytest.raises(
        VisaeError, match="no dataset folder someone/no-such-dataset, and downloading"
    ) as err:
        HFDataset("someone/no-such-dataset")
    assert "\n" not in str(err.value) and "outgoing traffic has been disabled" in str(err.value)
