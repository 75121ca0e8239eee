"""Object cutouts with exact masks: the real photographs among Tux Paint's stamps.

Debian's `tuxpaint-stamps-default` ships RGBA PNGs whose alpha channel is the object's mask, in a
category folder tree (a real taxonomy), each with a `.txt` whose first line is an English caption.
About half are photographs; the rest are drawings, letters and symbols. The photo rule below was
checked by eye on every stamp (see docs/datasets.md for the counts it gives):

1. a `.png` stamp, not a `*_mirror.png` / `*_back.png` variant;
2. not under `symbols/` (letters, coins, signs), the top-level `cartoon/` tree or any folder
   named `cartoon`;
3. its `.dat` does not mark it `colorable` or `tintable` (one-colour silhouettes and recolourable
   clip art);
4. photo texture: fewer than 15% of horizontally adjacent opaque pixel pairs have identical RGB
   (drawings have flat fills), and fewer than 15% of interior pixels lie where the image is
   locally linear (|Laplacian| < 0.5; airbrushed vector gradients are, photos are not);
5. not one of the few drawings that pass 1-4, listed in `NOT_PHOTOS`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visae.data.taxonomy import Taxonomy
from visae.errors import VisaeError

TUXPAINT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
TUXPAINT_HINT = (
    "install the Debian package tuxpaint-stamps-default (sudo apt-get install "
    "tuxpaint-stamps-default) or run `make system-deps`"
)

EXCLUDED_TREES = ("symbols", "cartoon")
FLAT_MAX = 0.15
LINEAR_MAX = 0.15
# Stamps that pass the automatic rule but are drawings or duplicates (checked by eye).
NOT_PHOTOS: dict[str, str] = {
    "clothes/button.png": "drawing",
    "seasonal/christmas/stocking.png": "drawing",
    "seasonal/easter/bluebird.png": "drawing",
    "seasonal/easter/bunny.png": "drawing",
    "seasonal/easter/butterfly.png": "drawing",
    "seasonal/easter/daffodil.png": "drawing",
    "seasonal/easter/wrapped_chocolate_easter_egg.png": "drawing",
    "seasonal/easter/wrapped_chocolate_easter_egg_2.png": "drawing",
    "seasonal/newyears/party-hat.png": "drawing",
    "military/fireman240a.png": "duplicate of people/fireman240a.png",
}
# YIQ chroma (0-255 scale) below which a stamp is too grey for a hue shift to be visible.
MIN_HUE_CHROMA = 12.0


@dataclass(frozen=True)
class ObjectStamp:
    """One object: RGBA pixels cropped to the object, alpha = mask (binarised at 128 on use)."""

    item: str  # taxonomy item path, e.g. "animals/mammals/bovines/bison"
    caption: str | None
    rgba: np.ndarray  # [h, w, 4] uint8
    source: str  # file the pixels came from, or "procedural"
    hue_shiftable: bool  # colourful enough that a hue shift visibly changes it
    mirrorable: bool = True  # False for stamps with text or handedness (Tux Paint's `nomirror`)

    @property
    def category(self) -> str:
        return self.item.rsplit("/", 1)[0]


@dataclass(frozen=True)
class StampSet:
    """The object vocabulary of a scene generator: stamps plus the taxonomy they form."""

    name: str  # "tuxpaint-photos" | "shapes"
    stamps: tuple[ObjectStamp, ...]
    taxonomy: Taxonomy
    fingerprint: str

    def __len__(self) -> int:
        return len(self.stamps)


@dataclass(frozen=True)
class StampDecision:
    """Why one Tux Paint stamp file is or is not used as a photo object."""

    path: str  # relative to the stamps root
    accepted: bool
    reason: str
    flat: float | None = None
    linear: float | None = None


def make_stamp_set(name: str, stamps: Sequence[ObjectStamp]) -> StampSet:
    """Bundle stamps with their taxonomy and a content fingerprint."""
    if not stamps:
        raise VisaeError(f"stamp set {name!r} is empty")
    h = hashlib.sha256(name.encode())
    for s in stamps:
        h.update(f"{s.item}|{s.caption}|{s.rgba.shape}|{s.hue_shiftable}|{s.mirrorable}".encode())
        h.update(np.ascontiguousarray(s.rgba).tobytes())
    taxonomy = Taxonomy({s.item: s.caption for s in stamps})
    return StampSet(name, tuple(stamps), taxonomy, h.hexdigest())


def texture_stats(rgba: np.ndarray) -> tuple[float, float]:
    """(flat, linear): the two photo-texture measures of rule 4 in the module docstring."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    opaque = alpha > 127
    pairs = opaque[:, 1:] & opaque[:, :-1]
    same = (rgb[:, 1:] == rgb[:, :-1]).all(-1) & pairs
    flat = float(same.sum() / max(1, pairs.sum()))
    interior = _erode(_erode(alpha > 250))
    grey = rgb.astype(np.float32).mean(-1)
    lap = np.zeros_like(grey)
    lap[1:-1, 1:-1] = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    )
    values = np.abs(lap[interior])
    linear = float((values < 0.5).mean()) if values.size else 1.0
    return flat, linear


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the 4-neighbour cross; outside the image counts as empty."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def _dat_flags(png: Path) -> set[str]:
    dat = png.with_suffix(".dat")
    if not dat.exists():
        return set()
    return set(dat.read_text(encoding="utf-8", errors="replace").split())


def _caption(png: Path) -> str | None:
    txt = png.with_suffix(".txt")
    if not txt.exists():
        return None
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0].strip() if lines and lines[0].strip() else None


def _load_rgba(png: Path) -> np.ndarray:
    with Image.open(png) as im:
        return np.asarray(im.convert("RGBA"))


def scan_tuxpaint(root: Path = TUXPAINT_STAMPS_DIR) -> list[StampDecision]:
    """Apply the photo rule to every stamp PNG under `root`, in sorted path order."""
    root = Path(root)
    if not root.is_dir():
        raise VisaeError(f"Tux Paint stamps not found at {root}: {TUXPAINT_HINT}")
    out = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root).as_posix()
        parts = rel.split("/")
        flags = _dat_flags(png)
        if png.stem.endswith(("_mirror", "_back")):
            out.append(StampDecision(rel, False, "mirror/back variant"))
        elif parts[0] in EXCLUDED_TREES or "cartoon" in parts[:-1]:
            out.append(StampDecision(rel, False, f"excluded tree ({parts[0]})"))
        elif flags & {"colorable", "tintable"}:
            out.append(StampDecision(rel, False, "colorable/tintable clip art"))
        else:
            rgba = _load_rgba(png)
            alpha = rgba[..., 3]
            if not (alpha < 128).any() or not (alpha >= 128).any():
                out.append(StampDecision(rel, False, "no usable alpha mask"))
                continue
            flat, linear = texture_stats(rgba)
            if flat >= FLAT_MAX or linear >= LINEAR_MAX:
                out.append(StampDecision(rel, False, "drawing-like texture", flat, linear))
            elif rel in NOT_PHOTOS:
                out.append(StampDecision(rel, False, NOT_PHOTOS[rel], flat, linear))
            else:
                out.append(StampDecision(rel, True, "photo", flat, linear))
    return out


def yiq_chroma(rgba: np.ndarray) -> float:
    """Mean chroma sqrt(I^2 + Q^2) of the opaque pixels, on a 0-255 scale."""
    rgb = rgba[..., :3][rgba[..., 3] >= 128].astype(np.float32)
    if rgb.size == 0:
        return 0.0
    i = rgb @ np.array([0.596, -0.274, -0.322], np.float32)
    q = rgb @ np.array([0.211, -0.523, 0.312], np.float32)
    return float(np.sqrt(i * i + q * q).mean())


def prepare_stamp(rgba: np.ndarray, max_side: int) -> np.ndarray:
    """Crop to the mask's bounding box and shrink so the longer side is at most `max_side`."""
    ys, xs = np.nonzero(rgba[..., 3] >= 128)
    if ys.size == 0:
        raise VisaeError("stamp has an empty mask")
    crop = rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(crop)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = Image.fromarray(crop, "RGBA").resize(size, Image.Resampling.LANCZOS)
    return np.asarray(im)


def item_path(rel_png: str) -> str:
    """Taxonomy item path of a stamp file: its folder path plus the file stem."""
    return rel_png[: -len(".png")]


@functools.lru_cache(maxsize=4)
def tuxpaint_stamps(root: str | Path = TUXPAINT_STAMPS_DIR, max_side: int = 256) -> StampSet:
    """The photo stamps as a `StampSet` (cached per process: scanning takes a couple of seconds)."""
    root = Path(root)
    stamps = []
    for d in scan_tuxpaint(root):
        if not d.accepted:
            continue
        png = root / d.path
        rgba = prepare_stamp(_load_rgba(png), max_side)
        stamps.append(
            ObjectStamp(
                item=item_path(d.path),
                caption=_caption(png),
                rgba=rgba,
                source=str(png),
                hue_shiftable=yiq_chroma(rgba) >= MIN_HUE_CHROMA,
                mirrorable="nomirror" not in _dat_flags(png),
            )
        )
    if not stamps:
        raise VisaeError(f"no photo stamps found under {root}: {TUXPAINT_HINT}")
    return make_stamp_set("tuxpaint-photos", stamps)


def tuxpaint_available(root: str | Path = TUXPAINT_STAMPS_DIR) -> bool:
    root = Path(root)
    return root.is_dir() and any(root.glob("animals/**/*.png"))
