"""COCO instance annotations: read any COCO-format dataset (image-level object labels, instance
masks from polygons or RLE) and write the concept scenes in that format."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visae.data.masks import decode_segmentation, patch_fractions
from visae.errors import VisaeError


class CocoDataset:
    """Images of a COCO instances file with their object categories as labels.

    `labels` are category names; `supercategories` the parents. Masks come from each
    annotation's `segmentation` (polygons, uncompressed or compressed RLE).
    """

    def __init__(
        self, annotations: str | Path, image_root: str | Path | None = None, name: str = "coco"
    ):
        self.annotations_path = Path(annotations)
        if not self.annotations_path.is_file():
            raise VisaeError(f"COCO annotation file not found: {self.annotations_path}")
        self.image_root = (
            Path(image_root) if image_root is not None else self.annotations_path.parent
        )
        if not self.image_root.is_dir():
            raise VisaeError(f"COCO image folder not found: {self.image_root}")
        self.image_root = self.image_root.absolute()  # images are read later, from any cwd
        raw = self.annotations_path.read_bytes()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise VisaeError(f"{self.annotations_path} is not valid JSON: {exc}") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise VisaeError(f"{self.annotations_path} has no '{key}' list: not COCO instances")
        self.name = name
        self.spec = f"coco:{self.annotations_path.resolve()}:{self.image_root.resolve()}"
        self.categories = {int(c["id"]): c for c in data["categories"]}
        self.images: list[dict[str, Any]] = sorted(data["images"], key=lambda im: int(im["id"]))
        self._row = {int(im["id"]): i for i, im in enumerate(self.images)}
        self._anns: list[list[dict[str, Any]]] = [[] for _ in self.images]
        for ann in data["annotations"]:
            row = self._row.get(int(ann["image_id"]))
            if row is None:
                raise VisaeError(
                    f"annotation {ann.get('id')} refers to unknown image {ann['image_id']}"
                )
            if int(ann["category_id"]) not in self.categories:
                raise VisaeError(
                    f"annotation {ann.get('id')} has unknown category {ann['category_id']}"
                )
            self._anns[row].append(ann)
        for anns in self._anns:
            anns.sort(key=lambda a: int(a.get("id", 0)))
        self._fingerprint = hashlib.sha256(b"coco|" + raw).hexdigest()

    def __len__(self) -> int:
        return len(self.images)

    def _path(self, i: int) -> Path:
        return self.image_root / self.images[i]["file_name"]

    def image(self, i: int) -> Image.Image:
        path = self._path(i)
        if not path.exists():
            raise VisaeError(f"COCO image {i} missing: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")

    def annotations(self, i: int) -> list[dict[str, Any]]:
        return self._anns[i]

    def metadata(self, i: int) -> dict[str, Any]:
        anns = self._anns[i]
        names = sorted({self.categories[int(a["category_id"])]["name"] for a in anns})
        supers = sorted(
            {str(self.categories[int(a["category_id"])].get("supercategory", "")) for a in anns}
            - {""}
        )
        return {
            "source": str(self.images[i]["file_name"]),
            "labels": names,
            "supercategories": supers,
            "image_id": int(self.images[i]["id"]),
            "objects": [
                {
                    "category": self.categories[int(a["category_id"])]["name"],
                    "bbox": [float(v) for v in a.get("bbox", [])],
                    "area": float(a.get("area", 0.0)),
                    "iscrowd": int(a.get("iscrowd", 0)),
                }
                for a in anns
            ],
        }

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def instance_masks(self, i: int) -> np.ndarray:
        """`[n_annotations, H, W]` bool, in annotation-id order."""
        h, w = int(self.images[i]["height"]), int(self.images[i]["width"])
        masks = [decode_segmentation(a["segmentation"], h, w) for a in self._anns[i]]
        return np.stack(masks) if masks else np.zeros((0, h, w), bool)

    def category_names(self) -> list[str]:
        return [self.categories[k]["name"] for k in sorted(self.categories)]

    def patch_labels(
        self, i: int, grid: tuple[int, int] = (16, 16), box: Sequence[float] | None = None
    ) -> np.ndarray:
        """`[rows * cols, n_categories]`: fraction of each patch covered by each category
        (categories in id order; crowd and non-crowd annotations alike)."""
        masks = self.instance_masks(i)
        ids = sorted(self.categories)
        out = np.zeros((grid[0] * grid[1], len(ids)), np.float32)
        for k, cid in enumerate(ids):
            own = [
                m for a, m in zip(self._anns[i], masks, strict=True) if int(a["category_id"]) == cid
            ]
            if own:
                union = np.logical_or.reduce(own).astype(np.uint8)
                out[:, k] = patch_fractions(union, 2, grid, box)[:, 1]
        return out


def scenes_to_coco(
    records: Sequence[dict[str, Any]], categories: Sequence[str], size: int, description: str
) -> dict[str, Any]:
    """COCO instances dict of rendered scene records (see `visae.data.scenes`).

    One category per finest taxonomy category (name = full path, supercategory = top level);
    one annotation per visible object, segmentation as compressed RLE of its visible mask.
    Extra per-annotation `attributes` (item, size, position, hue) are ignored by COCO readers.
    """
    cat_id = {c: k + 1 for k, c in enumerate(sorted(categories))}
    images, annotations = [], []
    for rec in records:
        images.append({"id": rec["id"], "file_name": rec["file"], "width": size, "height": size})
        for ann in rec["annotations"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rec["id"],
                    "category_id": cat_id[ann["category"]],
                    "segmentation": ann["rle"],
                    "area": ann["area"],
                    "bbox": ann["bbox"],
                    "iscrowd": 0,
                    "attributes": {k: ann[k] for k in ("item", "size", "position", "hue")},
                }
            )
    return {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k, "name": c, "supercategory": c.split("/")[0]} for c, k in cat_id.items()
        ],
    }
