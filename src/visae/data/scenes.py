"""Concept scenes: real object photos with exact masks placed on backgrounds, with exact
multi-label concepts, instance masks, and image pairs that differ in exactly one concept.

A scene is a JSON-able spec (background spec + objects with item, scale, centre, hue, flip),
sampled from `(seed, index)` alone and rendered from the spec alone, so scenes can be generated in
any order or in parallel, and an edited copy of a scene reproduces every untouched pixel.

Compositing uses a hard mask (stamp alpha >= 128): every pixel belongs to exactly one layer, the
background (layer 0) or one object (layer j + 1, later objects in front). The label map of layers
is the instance-mask file; visible masks never overlap, so removing an object changes pixels only
inside its visible mask.

Concept ids (see docs/datasets.md): `object:<category path>` at every taxonomy level,
`count:<n>`, `size:<small|medium|large>` (from the placement scale, not visible pixels),
`position:<region>` (3x3 grid cell of the object's centre), `background:<photo|texture|plain>`,
`hue:<natural|shift-120|shift-240>`. A concept's mask is the union of the visible masks of the
layers carrying it: an object carries its category, size, position and hue concepts, the background
carries its kind, and `count:<n>` covers the whole image. A concept is present iff its mask is
non-empty.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from visae import __version__
from visae.atomic import atomic_directory
from visae.data.backgrounds import (
    BACKGROUND_KINDS,
    background_photos,
    photos_fingerprint,
    render_background,
    sample_background,
)
from visae.data.coco import scenes_to_coco
from visae.data.masks import bbox_of, encode_rle
from visae.data.shapes import procedural_shapes
from visae.data.stamps import TUXPAINT_HINT, StampSet, tuxpaint_available, tuxpaint_stamps
from visae.errors import VisaeError

FORMAT = "visae-scenes/1"
MANIFEST = "scenes.json"
SIZE_BUCKETS: dict[str, tuple[float, float]] = {
    "small": (0.20, 0.30),
    "medium": (0.30, 0.42),
    "large": (0.42, 0.58),
}
HUES: dict[int, str] = {0: "natural", 120: "shift-120", 240: "shift-240"}
POSITIONS = (
    ("top-left", "top", "top-right"),
    ("left", "center", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)
PAIR_KINDS = ("removal", "swap", "recolour", "background")
OBJECT_SOURCES = ("auto", "stamps", "shapes")
_ATTEMPTS = 40
_PAIR_ATTEMPTS = 400


@dataclass(frozen=True)
class SceneConfig:
    """Everything that determines a scene set (with the object and background sources)."""

    n_scenes: int = 1000
    size: int = 224
    seed: int = 0
    objects: str = "auto"  # "stamps" (Tux Paint photos), "shapes", or "auto": stamps if installed
    min_objects: int = 1
    max_objects: int = 3
    pairs_per_kind: int = 50
    hue_shift_prob: float = 0.3
    background_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # photo, texture, plain
    min_visible: float = 0.3  # each object keeps at least this fraction of its pixels visible

    def __post_init__(self) -> None:
        if self.n_scenes < 1:
            raise VisaeError(f"n_scenes must be >= 1, got {self.n_scenes}")
        if self.size < 32:
            raise VisaeError(f"scene size must be >= 32 pixels, got {self.size}")
        if self.objects not in OBJECT_SOURCES:
            raise VisaeError(f"objects must be one of {OBJECT_SOURCES}, got {self.objects!r}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise VisaeError(
                "need 1 <= min_objects <= max_objects <= 8, "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if self.pairs_per_kind < 0:
            raise VisaeError(f"pairs_per_kind must be >= 0, got {self.pairs_per_kind}")
        if self.pairs_per_kind and self.max_objects < 2:
            raise VisaeError("removal pairs need max_objects >= 2 (or set pairs_per_kind to 0)")
        if not 0 <= self.hue_shift_prob <= 1:
            raise VisaeError(f"hue_shift_prob must be in [0, 1], got {self.hue_shift_prob}")
        w = self.background_weights
        if len(w) != len(BACKGROUND_KINDS) or min(w) < 0 or sum(w) <= 0:
            raise VisaeError(f"background_weights needs 3 non-negative weights, got {w}")
        if not 0 < self.min_visible <= 1:
            raise VisaeError(f"min_visible must be in (0, 1], got {self.min_visible}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"background_weights": list(self.background_weights)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneConfig:
        d = dict(d)
        d["background_weights"] = tuple(d["background_weights"])
        return cls(**d)

    @property
    def n_images(self) -> int:
        return self.n_scenes + self.pairs_per_kind * len(PAIR_KINDS)


@dataclass(frozen=True)
class ScenePair:
    """Two images that differ in one attribute: `old` concepts vanish, `new` ones appear.

    `side_removed` / `side_added` list the other concept changes the edit implies (only removal
    pairs have them: the count drops, and the removed object's size / position / hue concepts go
    when no other object carries them). Every concept not listed is identical in both images.
    """

    pair: int
    kind: str
    attribute: str  # "object" | "hue" | "background"
    image_a: int
    image_b: int
    object: int | None  # index of the edited object in image A (None: background edit)
    old: tuple[str, ...]
    new: tuple[str, ...]
    side_removed: tuple[str, ...] = ()
    side_added: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScenePair:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class RenderedScene:
    """One rendered image with everything known about it."""

    id: int
    role: str  # "scene" | "edit"
    spec: dict[str, Any]
    pixels: np.ndarray  # [S, S, 3] uint8
    layers: np.ndarray  # [S, S] uint8: 0 background, j + 1 object j
    layer_concepts: list[list[str]]  # concepts carried by each layer
    concepts: list[str]  # present concepts, vocabulary order
    pair: ScenePair | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)


def resolve_objects(objects: str) -> StampSet:
    """The object stamp set for `objects` ("auto" falls back to shapes with a one-line warning)."""
    if objects == "shapes":
        return procedural_shapes()
    if objects == "stamps":
        return tuxpaint_stamps()
    if tuxpaint_available():
        return tuxpaint_stamps()
    print(
        "visae: warning: Tux Paint photo stamps missing, using procedural shapes "
        f"({TUXPAINT_HINT})",
        file=sys.stderr,
    )
    return procedural_shapes()


def _hue_matrix(degrees: int) -> np.ndarray:
    """RGB -> RGB rotation of the chroma plane of YIQ by `degrees` (luma kept)."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    t = np.deg2rad(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return (np.linalg.inv(to_yiq) @ rot @ to_yiq).astype(np.float32)


_HUE_MATRICES = {d: _hue_matrix(d) for d in HUES if d}


class SceneGenerator:
    """Samples scene specs and pairs from a `SceneConfig` and renders them."""

    def __init__(self, config: SceneConfig, stamps: StampSet | None = None):
        self.config = config
        self.stamps = stamps if stamps is not None else resolve_objects(config.objects)
        self.taxonomy = self.stamps.taxonomy
        photos = background_photos()
        self._photos = {p.name: p for p in photos}
        self._photo_list = photos
        self._backgrounds_fingerprint = photos_fingerprint(photos)
        self._by_item = {s.item: s for s in self.stamps.stamps}
        self.concepts = concept_vocabulary(self.taxonomy.categories(), config.max_objects)
        self.concept_index = {c: i for i, c in enumerate(self.concepts)}
        w = np.asarray(config.background_weights, np.float64)
        self._bg_p = w / w.sum()
        self._pixel_cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}

    # ----- identity -------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What the generated bytes depend on; its hash keys caches."""
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "objects": self.stamps.name,
            "objects_fingerprint": self.stamps.fingerprint,
            "backgrounds": sorted(self._photos),
            "backgrounds_fingerprint": self._backgrounds_fingerprint,
        }

    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    # ----- objects ---------------------------------------------------------------------------
    def object_pixels(self, obj: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(rgb [h, w, 3] uint8, mask [h, w] bool) of one placed object, at its final size.

        Cached: sampling re-renders the same objects while it tries placements and edits.
        """
        key = (obj["item"], obj["scale"], obj["hue"], obj["flip"])
        hit = self._pixel_cache.get(key)
        if hit is None:
            if len(self._pixel_cache) >= 256:
                self._pixel_cache.clear()
            hit = self._pixel_cache[key] = self._object_pixels(obj)
        return hit

    def _object_pixels(self, obj: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        stamp = self._by_item.get(obj["item"])
        if stamp is None:
            raise VisaeError(f"object {obj['item']!r} is not in the stamp set {self.stamps.name!r}")
        h, w = stamp.rgba.shape[:2]
        longer = max(4, round(obj["scale"] * self.config.size))
        size = (
            (longer, max(1, round(h * longer / w)))
            if w >= h
            else (max(1, round(w * longer / h)), longer)
        )
        im = Image.fromarray(stamp.rgba, "RGBA").resize(size, Image.Resampling.LANCZOS)
        if obj["flip"]:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        rgba = np.asarray(im)
        rgb = rgba[..., :3]
        if obj["hue"]:
            shifted = rgb.reshape(-1, 3).astype(np.float32) @ _HUE_MATRICES[obj["hue"]].T
            rgb = np.clip(shifted + 0.5, 0, 255).astype(np.uint8).reshape(rgb.shape)
        return rgb, rgba[..., 3] >= 128

    def _origin(self, obj: dict[str, Any], h: int, w: int) -> tuple[int, int]:
        s = self.config.size
        cx, cy = obj["center"]
        x0 = min(max(round(cx - w / 2), 0), s - w)
        y0 = min(max(round(cy - h / 2), 0), s - h)
        return y0, x0

    def render(
        self, spec: dict[str, Any], pixels: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(rgb [S, S, 3] uint8 or None, layers [S, S] uint8) of a scene spec."""
        s = self.config.size
        rgb = render_background(spec["background"], s, self._photos) if pixels else None
        layers = np.zeros((s, s), np.uint8)
        for j, obj in enumerate(spec["objects"]):
            obj_rgb, mask = self.object_pixels(obj)
            h, w = mask.shape
            y0, x0 = self._origin(obj, h, w)
            region = layers[y0 : y0 + h, x0 : x0 + w]
            region[mask] = j + 1
            if rgb is not None:
                rgb[y0 : y0 + h, x0 : x0 + w][mask] = obj_rgb[mask]
        return rgb, layers

    def _visible_enough(self, spec: dict[str, Any], layers: np.ndarray) -> bool:
        counts = np.bincount(layers.ravel(), minlength=len(spec["objects"]) + 1)
        for j, obj in enumerate(spec["objects"]):
            full = int(self.object_pixels(obj)[1].sum())
            if counts[j + 1] < max(1, self.config.min_visible * full):
                return False
        return True

    # ----- concepts -------------------------------------------------------------------------
    def object_concepts(self, obj: dict[str, Any]) -> list[str]:
        category = self.taxonomy.category_of(obj["item"])
        cats = [f"object:{c}" for c in self.taxonomy.ancestors(category)]
        return [
            *cats,
            f"size:{obj['size']}",
            f"position:{position_of(obj['center'], self.config.size)}",
            f"hue:{HUES[obj['hue']]}",
        ]

    def layer_concepts(self, spec: dict[str, Any], layers: np.ndarray) -> list[list[str]]:
        """Concepts carried by each layer (background first); `count` by every layer."""
        n_visible = sum(bool((layers == j + 1).any()) for j in range(len(spec["objects"])))
        count = [f"count:{n_visible}"] if n_visible else []
        out = [[f"background:{spec['background']['kind']}", *count]]
        out += [[*self.object_concepts(obj), *count] for obj in spec["objects"]]
        return out

    def concepts_of(self, layer_concepts: list[list[str]], layers: np.ndarray) -> list[str]:
        """Concepts present in an image: those of every layer with a non-empty visible mask."""
        areas = np.bincount(layers.ravel(), minlength=len(layer_concepts))
        present = {c for j, cs in enumerate(layer_concepts) if areas[j] > 0 for c in cs}
        return sorted(present, key=self.concept_index.__getitem__)

    # ----- sampling -------------------------------------------------------------------------
    def _sample_object(self, rng: np.random.Generator) -> dict[str, Any]:
        """A random item at a random size bucket, scale, centre, hue and mirror."""
        stamp = self.stamps.stamps[int(rng.integers(len(self.stamps)))]
        size_name = list(SIZE_BUCKETS)[int(rng.integers(len(SIZE_BUCKETS)))]
        lo, hi = SIZE_BUCKETS[size_name]
        scale = round(float(rng.uniform(lo, hi)), 4)
        half = max(4, round(scale * self.config.size)) / 2
        s = self.config.size
        center = [
            round(float(rng.uniform(half, s - half)), 2),
            round(float(rng.uniform(half, s - half)), 2),
        ]
        shifted = stamp.hue_shiftable and rng.random() < self.config.hue_shift_prob
        hue = int(rng.choice([120, 240])) if shifted else 0
        flip = bool(rng.integers(2)) and stamp.mirrorable
        return {
            "item": stamp.item,
            "scale": scale,
            "size": size_name,
            "center": center,
            "hue": hue,
            "flip": flip,
        }

    def scene_spec(self, index: int) -> dict[str, Any]:
        """The spec of base scene `index` (a pure function of the config and the index)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 0, index])
        kind = BACKGROUND_KINDS[int(rng.choice(len(BACKGROUND_KINDS), p=self._bg_p))]
        spec: dict[str, Any] = {
            "background": sample_background(rng, kind, self._photo_list),
            "objects": [],
        }
        target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        for _ in range(_ATTEMPTS):
            if len(spec["objects"]) == target:
                break
            trial = {**spec, "objects": [*spec["objects"], self._sample_object(rng)]}
            if self._visible_enough(trial, self.render(trial, pixels=False)[1]):
                spec = trial
        if len(spec["objects"]) < cfg.min_objects:
            raise VisaeError(f"could not place {cfg.min_objects} visible objects in scene {index}")
        return spec

    def pair_spec(self, kind: str, k: int) -> tuple[int, dict[str, Any], ScenePair]:
        """(base scene id, edited spec, pair record) for the `k`-th pair of `kind`."""
        if kind not in PAIR_KINDS:
            raise VisaeError(f"unknown pair kind {kind!r} (expected one of {PAIR_KINDS})")
        cfg = self.config
        kind_index = PAIR_KINDS.index(kind)
        rng = np.random.default_rng([cfg.seed, 1 + kind_index, k])
        pair_id = kind_index * cfg.pairs_per_kind + k
        for _ in range(_PAIR_ATTEMPTS):
            base = int(rng.integers(cfg.n_scenes))
            spec_a = self.scene_spec(base)
            edit = self._edit(kind, spec_a, rng)
            if edit is None:
                continue
            spec_b, attribute, old, new, obj_index = edit
            layers_a = self.render(spec_a, pixels=False)[1]
            layers_b = self.render(spec_b, pixels=False)[1]
            if not self._visible_enough(spec_b, layers_b):
                continue
            ca = set(self.concepts_of(self.layer_concepts(spec_a, layers_a), layers_a))
            cb = set(self.concepts_of(self.layer_concepts(spec_b, layers_b), layers_b))
            removed, added = ca - cb, cb - ca
            if not (set(old) <= removed and set(new) <= added):
                continue
            side_removed, side_added = removed - set(old), added - set(new)
            if kind != "removal" and (side_removed or side_added):
                continue
            order = self.concept_index.__getitem__
            pair = ScenePair(
                pair=pair_id,
                kind=kind,
                attribute=attribute,
                image_a=base,
                image_b=cfg.n_scenes + pair_id,
                object=obj_index,
                old=tuple(sorted(old, key=order)),
                new=tuple(sorted(new, key=order)),
                side_removed=tuple(sorted(side_removed, key=order)),
                side_added=tuple(sorted(side_added, key=order)),
            )
            return base, spec_b, pair
        raise VisaeError(
            f"found no scene for {kind} pair {k} in {_PAIR_ATTEMPTS} tries "
            f"(n_scenes={cfg.n_scenes}, objects per scene {cfg.min_objects}..{cfg.max_objects})"
        )

    def _category_concepts(self, obj: dict[str, Any]) -> set[str]:
        return {c for c in self.object_concepts(obj) if c.startswith("object:")}

    def _edit(
        self, kind: str, spec: dict[str, Any], rng: np.random.Generator
    ) -> tuple[dict[str, Any], str, set[str], set[str], int | None] | None:
        """One candidate edit of `spec`: (edited spec, attribute, old concepts, new concepts,
        index of the edited object or None)."""
        objects = spec["objects"]
        j = int(rng.integers(len(objects)))
        others = [o for i, o in enumerate(objects) if i != j]
        carried = set().union(*(self._category_concepts(o) for o in others)) if others else set()
        if kind == "background":
            old_kind = spec["background"]["kind"]
            choices = [k for k in BACKGROUND_KINDS if k != old_kind]
            new_kind = choices[int(rng.integers(len(choices)))]
            bg = sample_background(rng, new_kind, self._photo_list)
            return (
                {**spec, "background": bg},
                "background",
                {f"background:{old_kind}"},
                {f"background:{new_kind}"},
                None,
            )
        obj = objects[j]
        finest = f"object:{self.taxonomy.category_of(obj['item'])}"
        if kind == "removal":
            if len(objects) < 2:
                return None
            old = self._category_concepts(obj) - carried
            if finest not in old:
                return None
            return {**spec, "objects": others}, "object", old, set(), j
        if kind == "swap":
            new_item = self.stamps.stamps[int(rng.integers(len(self.stamps)))].item
            new_obj = {**obj, "item": new_item}
            if not self._by_item[new_item].mirrorable:
                new_obj["flip"] = False
            if obj["hue"] and not self._by_item[new_item].hue_shiftable:
                return None
            old_c, new_c = self._category_concepts(obj), self._category_concepts(new_obj)
            old, new = old_c - carried - new_c, new_c - carried - old_c
            new_finest = f"object:{self.taxonomy.category_of(new_item)}"
            if finest not in old or new_finest not in new:
                return None
            edited = [*objects[:j], new_obj, *objects[j + 1 :]]
            return {**spec, "objects": edited}, "object", old, new, j
        if kind == "recolour":
            if not self._by_item[obj["item"]].hue_shiftable:
                return None
            hue_others = {o["hue"] for o in others}
            choices = [h for h in HUES if h != obj["hue"] and h not in hue_others]
            if obj["hue"] in hue_others or not choices:
                return None
            new_hue = choices[int(rng.integers(len(choices)))]
            edited = [*objects[:j], {**obj, "hue": new_hue}, *objects[j + 1 :]]
            return (
                {**spec, "objects": edited},
                "hue",
                {f"hue:{HUES[obj['hue']]}"},
                {f"hue:{HUES[new_hue]}"},
                j,
            )
        raise VisaeError(f"unknown pair kind {kind!r}")

    # ----- rendering ------------------------------------------------------------------------
    def scene(self, image_id: int) -> RenderedScene:
        """Render image `image_id`: base scenes first, then the edited image of each pair."""
        cfg = self.config
        if not 0 <= image_id < cfg.n_images:
            raise VisaeError(f"image id {image_id} out of range 0..{cfg.n_images - 1}")
        pair = None
        if image_id < cfg.n_scenes:
            spec, role = self.scene_spec(image_id), "scene"
        else:
            p = image_id - cfg.n_scenes
            kind = PAIR_KINDS[p // cfg.pairs_per_kind]
            _, spec, pair = self.pair_spec(kind, p % cfg.pairs_per_kind)
            role = "edit"
        rgb, layers = self.render(spec)
        assert rgb is not None
        layer_concepts = self.layer_concepts(spec, layers)
        objects = []
        for j, obj in enumerate(spec["objects"]):
            mask = layers == j + 1
            objects.append(
                {
                    "item": obj["item"],
                    "category": self.taxonomy.category_of(obj["item"]),
                    "size": obj["size"],
                    "position": position_of(obj["center"], cfg.size),
                    "hue": HUES[obj["hue"]],
                    "area": int(mask.sum()),
                    "bbox": bbox_of(mask),
                }
            )
        return RenderedScene(
            id=image_id,
            role=role,
            spec=spec,
            pixels=rgb,
            layers=layers,
            layer_concepts=layer_concepts,
            concepts=self.concepts_of(layer_concepts, layers),
            pair=pair,
            objects=objects,
        )


def concept_vocabulary(categories: Sequence[str], max_objects: int) -> list[str]:
    """All concept ids, in table order."""
    out = [f"object:{c}" for c in sorted(categories)]
    out += [f"count:{n}" for n in range(1, max_objects + 1)]
    out += [f"size:{s}" for s in SIZE_BUCKETS]
    out += [f"position:{p}" for row in POSITIONS for p in row]
    out += [f"background:{k}" for k in BACKGROUND_KINDS]
    out += [f"hue:{h}" for h in HUES.values()]
    return out


def position_of(center: Sequence[float], size: int) -> str:
    """3x3 grid cell of a centre point."""
    col = min(2, int(center[0] * 3 / size))
    row = min(2, int(center[1] * 3 / size))
    return POSITIONS[row][col]


# ----- writing a scene folder -----------------------------------------------------------------

_WORKER: SceneGenerator | None = None


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_one(gen: SceneGenerator, folder: Path, image_id: int) -> dict[str, Any]:
    sc = gen.scene(image_id)
    name = f"{image_id:06d}.png"
    png = _png_bytes(sc.pixels)
    (folder / "images" / name).write_bytes(png)
    (folder / "masks" / name).write_bytes(_png_bytes(sc.layers))
    annotations = [
        {"rle": encode_rle(sc.layers == j + 1), **obj} for j, obj in enumerate(sc.objects)
    ]
    record: dict[str, Any] = {
        "id": image_id,
        "file": f"images/{name}",
        "mask": f"masks/{name}",
        "role": sc.role,
        "spec": sc.spec,
        "layer_concepts": sc.layer_concepts,
        "concepts": sc.concepts,
        "sha256": hashlib.sha256(png).hexdigest(),
        "annotations": annotations,
    }
    if sc.pair is not None:
        record["pair"] = sc.pair.to_dict()
    return record


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def write_tables(folder: Path, gen: SceneGenerator, records: list[dict[str, Any]]) -> None:
    """Write index, concept and pair tables, the COCO export and (last) the manifest."""
    records = sorted(records, key=lambda r: r["id"])
    concepts = gen.concepts
    with open(folder / "index.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            lean = {k: v for k, v in rec.items() if k != "annotations"}
            lean["objects"] = [
                {k: v for k, v in a.items() if k != "rle"} for a in rec["annotations"]
            ]
            f.write(_dump(lean) + "\n")
    with open(folder / "concepts.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "file", "role", *concepts])
        for rec in records:
            present = set(rec["concepts"])
            w.writerow(
                [rec["id"], rec["file"], rec["role"], *(int(c in present) for c in concepts)]
            )
    pairs = [ScenePair.from_dict(rec["pair"]) for rec in records if "pair" in rec]
    with open(folder / "pairs.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        header = ["pair", "kind", "attribute", "image_a", "image_b", "object", "old", "new"]
        w.writerow([*header, "side_removed", "side_added"])
        for p in pairs:
            lists = (p.old, p.new, p.side_removed, p.side_added)
            obj = "" if p.object is None else p.object
            row = [p.pair, p.kind, p.attribute, p.image_a, p.image_b, obj]
            w.writerow(row + [";".join(v) for v in lists])
    finest = sorted({gen.taxonomy.category_of(i) for i in gen.taxonomy.items()})
    coco = scenes_to_coco(
        records, finest, gen.config.size, f"visae concept scenes ({gen.stamps.name}), {FORMAT}"
    )
    (folder / "coco.json").write_text(_dump(coco), encoding="utf-8")
    digest = hashlib.sha256(FORMAT.encode())
    for rec in records:
        digest.update(rec["sha256"].encode())
    counts = np.zeros(len(concepts), np.int64)
    index = gen.concept_index
    for rec in records:
        for c in rec["concepts"]:
            counts[index[c]] += 1
    manifest = {
        "format": FORMAT,
        "visae_version": __version__,
        "identity": gen.identity(),
        "key": gen.key(),
        "concepts": concepts,
        "concept_counts": {c: int(n) for c, n in zip(concepts, counts, strict=True)},
        "taxonomy": gen.taxonomy.to_dict(),
        "n_images": len(records),
        "n_scenes": gen.config.n_scenes,
        "n_pairs": len(pairs),
        "fingerprint": digest.hexdigest(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1), encoding="utf-8")


def _work(task: tuple[str, list[int]]) -> list[dict[str, Any]]:
    folder, ids = task
    assert _WORKER is not None
    return [_write_one(_WORKER, Path(folder), i) for i in ids]


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def generate_scenes(
    config: SceneConfig,
    out: str | Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    generator: SceneGenerator | None = None,
) -> Path:
    """Render a scene folder (images, masks, tables, COCO export) at `out`, atomically.

    The folder is built under a temporary name beside `out` and renamed when complete, so a
    crash never leaves a half-written scene set where a reader would find it.
    """
    global _WORKER
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VisaeError(f"scene folder {out} already exists and is not empty (pass overwrite)")
    gen = generator if generator is not None else SceneGenerator(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = config.n_images
    workers = default_workers() if workers is None else max(1, workers)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=n, desc="rendering scenes", unit="img", disable=not progress)
    try:
        with atomic_directory(out) as tmp:
            (tmp / "images").mkdir()
            (tmp / "masks").mkdir()
            tasks = [(str(tmp), ids) for ids in _chunks(n, 25)]
            if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
                _WORKER = gen
                ctx = multiprocessing.get_context("fork")
                with ctx.Pool(workers) as pool:
                    for chunk in pool.imap(_work, tasks):
                        records.extend(chunk)
                        bar.update(len(chunk))
            else:
                for _, ids in tasks:
                    for i in ids:
                        records.append(_write_one(gen, tmp, i))
                        bar.update(1)
            write_tables(tmp, gen, records)
    finally:
        _WORKER = None
        bar.close()
    return out
