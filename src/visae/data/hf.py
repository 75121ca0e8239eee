"""Hugging Face image datasets read straight from their files: a `save_to_disk` folder (one
dataset, or a DatasetDict with split folders) or a hub-layout folder of parquet files; a hub id
is downloaded first (parquet files only, needs internet). The `datasets` library is not needed:
pyarrow reads the Arrow IPC streams and parquet files, and the feature types come from
`dataset_info.json` or the parquet schema's `huggingface` metadata."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

from visae.errors import VisaeError, first_line

_LIST_TYPES = ("List", "Sequence", "LargeList")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise VisaeError(
            "reading Hugging Face datasets needs pyarrow: pip install 'visae[hf]'"
        ) from None
    return pyarrow


def _read_arrow_folder(folder: Path) -> tuple[Any, dict[str, Any], list[Path]]:
    """(table, features, files) of one `save_to_disk` dataset folder."""
    pa = _pyarrow()
    state = json.loads((folder / "state.json").read_text())
    files = [folder / entry["filename"] for entry in state["_data_files"]]
    info_path = folder / "dataset_info.json"
    features = json.loads(info_path.read_text()).get("features", {}) if info_path.is_file() else {}
    tables = []
    for path in files:
        if not path.is_file():
            raise VisaeError(f"Hugging Face dataset file missing: {path}")
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            tables.append(reader.read_all())
    return pa.concat_tables(tables), features, files


def _parquet_splits(root: Path) -> dict[str, list[Path]]:
    """Split name -> parquet files, from the hub naming `<split>-00000-of-00001.parquet` or a
    `<split>/` folder."""
    splits: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.parquet")):
        match = re.match(r"^(.+?)-\d+-of-\d+\.parquet$", path.name)
        split = match.group(1) if match else path.parent.name
        splits.setdefault(split, []).append(path)
    return splits


def _read_parquet(files: list[Path]) -> tuple[Any, dict[str, Any]]:
    pa = _pyarrow()
    tables = [pa.parquet.read_table(str(p), memory_map=True) for p in files]
    hf_meta = (tables[0].schema.metadata or {}).get(b"huggingface", b"{}")
    features = json.loads(hf_meta).get("info", {}).get("features", {})
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables]), features


def _choose_split(splits: list[str], split: str | None, where: Path) -> str:
    if split is None:
        if "train" in splits or len(splits) == 1:
            return "train" if "train" in splits else splits[0]
        raise VisaeError(f"{where} has splits {splits}: name one as hf:DIR:SPLIT")
    if split not in splits:
        raise VisaeError(f"{where} has no split {split!r} (splits: {', '.join(splits)})")
    return split


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, repo_type="dataset", allow_patterns=["*.parquet", "*.json", "*.md"]
            )
        )
    except Exception as exc:  # the hub client raises many types; the message names the cause
        raise VisaeError(
            f"no dataset folder {repo_id}, and downloading it from the Hugging Face hub "
            f"failed: {first_line(exc)}"
        ) from None


class HFDataset:
    """An image column (feature type `Image`) with ClassLabel columns as labels.

    Labels: the class names of every ClassLabel (or list-of-ClassLabel) column, prefixed by
    `column=` when there are several such columns. Images whose bytes are absent are read from
    their stored path. The fingerprint hashes the data files.
    """

    def __init__(
        self, location: str | Path, split: str | None = None, image_column: str | None = None
    ):
        root = Path(location)
        where = str(root.resolve())
        if not root.exists():
            if not _HUB_ID.match(str(location)):
                raise VisaeError(f"Hugging Face dataset folder {location} does not exist")
            root = _download(str(location))
            where = str(location)
        root = root.absolute()  # images stored by path and the files are read later
        if (root / "dataset_dict.json").is_file():
            names = json.loads((root / "dataset_dict.json").read_text())["splits"]
            split = _choose_split(names, split, root)
            table, features, files = _read_arrow_folder(root / split)
        elif (root / "state.json").is_file():
            if split is not None:
                raise VisaeError(f"{root} is a single dataset (no splits); drop ':{split}'")
            table, features, files = _read_arrow_folder(root)
        else:
            splits = _parquet_splits(root)
            if not splits:
                raise VisaeError(
                    f"{root} is not a Hugging Face dataset: no state.json, dataset_dict.json "
                    "or .parquet files"
                )
            split = _choose_split(sorted(splits), split, root)
            files = splits[split]
            table, features = _read_parquet(files)
        self.root, self.split, self._files = root, split, files
        self.name = f"hf:{location}" + (f":{split}" if split else "")
        self.spec = f"hf:{where}" + (f":{split}" if split else "") if image_column is None else None
        self.image_column = self._image_column(table, features, image_column)
        self._images = table.column(self.image_column)
        self._labels = self._label_columns(table, features)
        self._fingerprint: str | None = None

    def _image_column(self, table: Any, features: dict[str, Any], wanted: str | None) -> str:
        images = [name for name, f in features.items() if f.get("_type") == "Image"]
        if not features:  # no feature metadata: recognise the Image struct by its fields
            images = [
                field.name
                for field in table.schema
                if str(field.type) == "struct<bytes: binary, path: string>"
            ]
        if wanted is not None:
            if wanted not in images:
                raise VisaeError(f"{self.name}: {wanted!r} is not an image column ({images})")
            return wanted
        if not images:
            raise VisaeError(f"{self.name} has no image column (feature type Image)")
        return images[0]

    @staticmethod
    def _label_columns(table: Any, features: dict[str, Any]) -> list[tuple[str, list[str], Any]]:
        """(column, class names, values) of every ClassLabel or list-of-ClassLabel column."""
        out = []
        for name, feature in features.items():
            inner = feature.get("feature", {}) if feature.get("_type") in _LIST_TYPES else feature
            if inner.get("_type") == "ClassLabel" and "names" in inner:
                out.append((name, inner["names"], table.column(name)))
        return out

    def __len__(self) -> int:
        return len(self._images)

    def image(self, i: int) -> Image.Image:
        cell = self._images[i].as_py()
        try:
            if cell.get("bytes"):
                source: Any = io.BytesIO(cell["bytes"])
            elif cell.get("path"):
                path = Path(cell["path"])
                source = path if path.is_absolute() else self.root / path
            else:
                raise VisaeError(f"{self.name} image {i} has neither bytes nor a path")
            with Image.open(source) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise VisaeError(f"cannot read image {i} of {self.name}: {exc}") from None

    def metadata(self, i: int) -> dict[str, Any]:
        labels = []
        prefixed = len(self._labels) > 1
        for column, names, values in self._labels:
            value = values[i].as_py()
            for index in value if isinstance(value, list) else [value]:
                if index is not None and 0 <= index < len(names):
                    labels.append(f"{column}={names[index]}" if prefixed else names[index])
        return {"source": f"{self.name}#{i}", "labels": labels}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(f"hf:{self.split}:{self.image_column}".encode())
            for path in self._files:
                with path.open("rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
