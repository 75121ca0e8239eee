"""A rendered scene folder on disk, written by `visae.data.scenes.generate_scenes` and read
back as an `ImageDataset` with masks, concept tables, per-patch labels, pairs and the taxonomy.

Folder layout (all files deterministic for a given generator identity):

    scenes.json    manifest: format, generator identity, concepts, taxonomy, counts, fingerprint
    index.jsonl    one JSON line per image: spec, concepts per layer, objects, pair, sha256
    images/NNNNNN.png   the RGB image
    masks/NNNNNN.png    8-bit label map: 0 background, j = j-th object (drawing order)
    concepts.csv   image x concept 0/1 table
    pairs.csv      one row per pair: ids, kind, old / new / side concepts (';'-separated)
    coco.json      COCO instances export (RLE masks of the visible objects)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visae.data.masks import patch_fractions
from visae.data.scenes import FORMAT, MANIFEST, SceneConfig, ScenePair
from visae.data.taxonomy import Taxonomy
from visae.errors import VisaeError


class SceneDataset:
    """A scene folder as an `ImageDataset`, plus exact masks, concepts and pairs.

    `name` is `scenes` for photo-object scenes, `scenes-shapes` for the procedural fallback;
    `spec` is `scenes:<absolute folder>` (`load_dataset` gives the cached default scenes
    the spec `scenes` or `scenes:shapes`, which render them again where the cache is gone).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], records: list[dict[str, Any]]):
        objects = manifest["identity"]["objects"]
        self.name = "scenes" if objects == "tuxpaint-photos" else f"scenes-{objects}"
        self.folder = folder
        self.spec: str | None = f"scenes:{folder.resolve()}"
        self.manifest = manifest
        self.records = records
        self.concepts: list[str] = list(manifest["concepts"])
        self.concept_index = {c: i for i, c in enumerate(self.concepts)}
        self.config = SceneConfig.from_dict(manifest["identity"]["config"])
        self.taxonomy = Taxonomy.from_dict(manifest["taxonomy"])
        self.pairs: list[ScenePair] = [
            ScenePair.from_dict(r["pair"]) for r in records if "pair" in r
        ]

    @classmethod
    def load(cls, folder: str | Path, verify: bool = False) -> SceneDataset:
        """Open a scene folder; `verify` re-hashes every image against the index."""
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not mpath.is_file():
            raise VisaeError(f"{folder} is not a scene folder (no {MANIFEST})")
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise VisaeError(f"{mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}")
        ipath = folder / "index.jsonl"
        if not ipath.is_file():
            raise VisaeError(f"scene folder {folder} has no index.jsonl")
        with open(ipath, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        if len(records) != manifest["n_images"] or [r["id"] for r in records] != list(
            range(len(records))
        ):
            raise VisaeError(
                f"{ipath} lists {len(records)} images, manifest says {manifest['n_images']}"
            )
        for rec in records:
            for key in ("file", "mask"):
                if not (folder / rec[key]).is_file():
                    raise VisaeError(f"scene folder {folder} is missing {rec[key]}")
        ds = cls(folder.absolute(), manifest, records)
        if verify:
            ds.verify()
        return ds

    def verify(self) -> None:
        """Raise if any image's bytes differ from the sha256 recorded at generation."""
        digest = hashlib.sha256(FORMAT.encode())
        for rec in self.records:
            actual = hashlib.sha256((self.folder / rec["file"]).read_bytes()).hexdigest()
            if actual != rec["sha256"]:
                raise VisaeError(
                    f"scene image {rec['file']} in {self.folder} was modified (sha256)"
                )
            digest.update(actual.encode())
        if digest.hexdigest() != self.manifest["fingerprint"]:
            raise VisaeError(f"scene folder {self.folder}: fingerprint does not match its images")

    # ----- ImageDataset ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def _rec(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.records):
            raise VisaeError(f"scene image {i} out of range 0..{len(self.records) - 1}")
        return self.records[i]

    def image(self, i: int) -> Image.Image:
        with Image.open(self.folder / self._rec(i)["file"]) as im:
            return im.convert("RGB")

    def metadata(self, i: int) -> dict[str, Any]:
        rec = self._rec(i)
        out = {
            "source": rec["file"],
            "labels": list(rec["concepts"]),
            "role": rec["role"],
            "objects": rec["objects"],
            "background": rec["spec"]["background"]["kind"],
        }
        if "pair" in rec:
            out["pair"] = rec["pair"]
        return out

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    # ----- masks and labels -----------------------------------------------------------------
    def label_map(self, i: int) -> np.ndarray:
        """`[H, W]` uint8: 0 background, j + 1 where object j is visible."""
        with Image.open(self.folder / self._rec(i)["mask"]) as im:
            return np.asarray(im)

    def instance_masks(self, i: int) -> np.ndarray:
        """`[n_objects, H, W]` bool visible masks, in drawing order."""
        layers = self.label_map(i)
        n = len(self._rec(i)["objects"])
        return layers[None] == np.arange(1, n + 1, dtype=np.uint8)[:, None, None]

    def layer_concepts(self, i: int) -> np.ndarray:
        """`[n_layers, n_concepts]` bool: the concepts each layer (background, objects) carries."""
        rec = self._rec(i)
        out = np.zeros((len(rec["layer_concepts"]), len(self.concepts)), bool)
        for j, cs in enumerate(rec["layer_concepts"]):
            out[j, [self.concept_index[c] for c in cs]] = True
        return out

    def concept_mask(self, i: int, concept: str) -> np.ndarray:
        """`[H, W]` bool: where `concept` is (the union of the layers that carry it)."""
        k = self._concept(concept)
        carriers = np.flatnonzero(self.layer_concepts(i)[:, k])
        return np.isin(self.label_map(i), carriers)

    def concept_matrix(self) -> np.ndarray:
        """`[n_images, n_concepts]` bool image-level labels."""
        out = np.zeros((len(self.records), len(self.concepts)), bool)
        for i, rec in enumerate(self.records):
            out[i, [self.concept_index[c] for c in rec["concepts"]]] = True
        return out

    def patch_labels(
        self, i: int, grid: tuple[int, int] = (16, 16), box: Sequence[float] | None = None
    ) -> np.ndarray:
        """`[rows * cols, n_concepts]` float32: fraction of each patch covered by each concept.

        `box` `(x0, y0, x1, y1)` is the image region the grid tiles (default: the whole image),
        for models that crop.
        """
        carriers = self.layer_concepts(i).astype(np.float32)
        frac = patch_fractions(self.label_map(i), carriers.shape[0], grid, box)
        return frac @ carriers

    def _concept(self, concept: str) -> int:
        try:
            return self.concept_index[concept]
        except KeyError:
            raise VisaeError(f"unknown concept {concept!r} in scene folder {self.folder}") from None

    # ----- subsets --------------------------------------------------------------------------
    def scene_ids(self) -> list[int]:
        return [r["id"] for r in self.records if r["role"] == "scene"]

    def edit_ids(self) -> list[int]:
        return [r["id"] for r in self.records if r["role"] == "edit"]
