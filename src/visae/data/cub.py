"""CUB-200-2011 with its image-level attribute annotations (the concept labels of Klotz et al.).

Layout of the official archive (`CUB_200_2011.tgz`): the dataset folder holds `images.txt`,
`image_class_labels.txt`, `classes.txt`, `bounding_boxes.txt`, `train_test_split.txt`,
`images/` and `attributes/image_attribute_labels.txt`; the attribute names `attributes.txt` sit
one level up, beside the dataset folder (some copies move them into the folder or into
`attributes/`; all three places are searched).

`image_attribute_labels.txt` lines are `<image_id> <attribute_id> <is_present> <certainty_id>
<time>`; a few lines of the official file carry an extra field, so only the first four are read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visae.errors import VisaeError

CERTAINTIES = {1: "not visible", 2: "guessing", 3: "probably", 4: "definitely"}


def _table(path: Path, min_fields: int) -> list[list[str]]:
    if not path.is_file():
        raise VisaeError(f"CUB file missing: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < min_fields:
            raise VisaeError(f"{path}:{n}: expected {min_fields} fields, got {len(fields)}")
        rows.append(fields)
    return rows


def _ids(rows: list[list[str]], path: Path) -> dict[int, list[str]]:
    try:
        return {int(r[0]): r[1:] for r in rows}
    except ValueError:
        raise VisaeError(f"{path}: first column must be integer ids") from None


class Cub200Dataset:
    """CUB-200-2011 images; labels are `class:<name>` plus `attr:<attribute>` for every
    attribute marked present with certainty >= `min_certainty` (1 = any, 4 = definitely)."""

    def __init__(self, root: str | Path, split: str | None = None, min_certainty: int = 1):
        if not Path(root).is_dir():
            raise VisaeError(f"CUB-200-2011 folder not found: {root}")
        self.root = Path(root).absolute()  # images are read later, from any working directory
        if split not in (None, "train", "test"):
            raise VisaeError(f"CUB split must be 'train', 'test' or None, got {split!r}")
        if min_certainty not in CERTAINTIES:
            raise VisaeError(f"min_certainty must be 1..4, got {min_certainty}")
        images = _ids(_table(self.root / "images.txt", 2), self.root / "images.txt")
        labels = _ids(
            _table(self.root / "image_class_labels.txt", 2), self.root / "image_class_labels.txt"
        )
        classes = _ids(_table(self.root / "classes.txt", 2), self.root / "classes.txt")
        ids = sorted(images)
        if split is not None:
            spath = self.root / "train_test_split.txt"
            is_train = _ids(_table(spath, 2), spath)
            want = "1" if split == "train" else "0"
            ids = [i for i in ids if is_train.get(i, ["?"])[0] == want]
        self.image_ids = ids
        default = split is None and min_certainty == 1
        self.spec = f"cub:{self.root.resolve()}" if default else None
        self.files = [images[i][0] for i in ids]
        try:
            self.class_ids = [int(labels[i][0]) for i in ids]
        except KeyError as exc:
            raise VisaeError(
                f"{self.root}/image_class_labels.txt has no class for image {exc}"
            ) from None
        self.class_names = {k: v[0] for k, v in classes.items()}
        unknown = set(self.class_ids) - set(self.class_names)
        if unknown:
            raise VisaeError(f"{self.root}/classes.txt lacks class ids {sorted(unknown)[:5]}")
        bpath = self.root / "bounding_boxes.txt"
        boxes = _ids(_table(bpath, 5), bpath) if bpath.exists() else {}
        self.boxes = {i: [float(v) for v in boxes[i][:4]] for i in ids if i in boxes}
        self.attribute_names = self._attribute_names()
        self.attributes, self.certainty = self._attribute_table(min_certainty)
        self.split = split
        self.min_certainty = min_certainty
        self.name = "cub-200-2011" + (f":{split}" if split else "")
        h = hashlib.sha256(f"{self.name}|{min_certainty}".encode())
        for rel in self.files:
            h.update(rel.encode() + b"\0")
        h.update(np.asarray(self.class_ids, np.int64).tobytes())
        h.update(self.attributes.tobytes())
        self._files_hash = h
        self._fingerprint: str | None = None

    def _attribute_names(self) -> list[str]:
        for path in (
            self.root.parent / "attributes.txt",
            self.root / "attributes.txt",
            self.root / "attributes" / "attributes.txt",
        ):
            if path.is_file():
                table = _ids(_table(path, 2), path)
                n = max(table)
                if sorted(table) != list(range(1, n + 1)):
                    raise VisaeError(f"{path}: attribute ids must be 1..{n} without gaps")
                return [table[k][0] for k in range(1, n + 1)]
        raise VisaeError(
            f"CUB attributes.txt not found beside or inside {self.root} (the official archive "
            "puts it next to the CUB_200_2011 folder)"
        )

    def _attribute_table(self, min_certainty: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.root / "attributes" / "image_attribute_labels.txt"
        row = {image_id: r for r, image_id in enumerate(self.image_ids)}
        present = np.zeros((len(self.image_ids), len(self.attribute_names)), bool)
        certainty = np.zeros(present.shape, np.uint8)
        for n, fields in enumerate(_table(path, 4), 1):
            try:
                image_id, attr, is_present, cert = (int(v) for v in fields[:4])
            except ValueError:
                raise VisaeError(f"{path}:{n}: non-integer field in {fields[:4]}") from None
            r = row.get(image_id)
            if r is None:
                continue
            if not 1 <= attr <= len(self.attribute_names):
                raise VisaeError(f"{path}:{n}: attribute id {attr} out of range")
            certainty[r, attr - 1] = cert
            present[r, attr - 1] = is_present == 1 and cert >= min_certainty
        return present, certainty

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        path = self.root / "images" / self.files[i]
        if not path.is_file():
            raise VisaeError(f"CUB image missing: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")

    def metadata(self, i: int) -> dict[str, Any]:
        image_id = self.image_ids[i]
        cls = self.class_names[self.class_ids[i]]
        attrs = [self.attribute_names[k] for k in np.flatnonzero(self.attributes[i])]
        out: dict[str, Any] = {
            "source": f"images/{self.files[i]}",
            "labels": [f"class:{cls}", *(f"attr:{a}" for a in attrs)],
            "image_id": image_id,
            "class": cls,
        }
        if image_id in self.boxes:
            out["bbox"] = self.boxes[image_id]
        return out

    def concept_matrix(self) -> np.ndarray:
        """`[n_images, n_attributes]` bool attribute labels (columns: `attribute_names`)."""
        return self.attributes.copy()

    @property
    def fingerprint(self) -> str:
        """Hash of the annotations and the image bytes (read once, on first use)."""
        if self._fingerprint is None:
            h = self._files_hash.copy()
            for rel in self.files:
                h.update(hashlib.sha256((self.root / "images" / rel).read_bytes()).digest())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
