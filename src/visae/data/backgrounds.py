"""Scene backgrounds: random crops of real photos, procedural textures and plain colours.

A background is described by a small JSON-able spec (kind plus parameters) and rendered from the
spec alone, so an edited scene reproduces its background bit for bit.

The photos are the scenery and texture photos among opencv-doc's sample images and scikit-image's
bundled images: pictures whose subject is one of the object categories (fruit, animals, vehicles,
people) are left out so that a background never shows an unlabelled object of a known concept.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visae.errors import VisaeError

OPENCV_SAMPLES_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_PHOTOS = (
    "aero1.jpg",
    "aero3.jpg",
    "board.jpg",
    "building.jpg",
    "ela_original.jpg",
    "graf1.png",
    "graf3.png",
    "home.jpg",
    "left.jpg",
    "leuvenA.jpg",
    "leuvenB.jpg",
)
SKIMAGE_PHOTOS = ("brick.png", "grass.png", "gravel.png")
BACKGROUND_KINDS = ("photo", "texture", "plain")
TEXTURES = ("stripes", "checker", "dots", "noise", "gradient")
_MAX_PHOTO_SIDE = 640


def skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@dataclass(frozen=True)
class BackgroundPhoto:
    name: str  # e.g. "opencv/building.jpg"
    image: Image.Image  # RGB, shorter side <= _MAX_PHOTO_SIDE


@functools.lru_cache(maxsize=2)
def background_photos(opencv_dir: str | Path = OPENCV_SAMPLES_DIR) -> tuple[BackgroundPhoto, ...]:
    """The background photos present on this machine (scikit-image's are always there)."""
    found = [(f"opencv/{n}", Path(opencv_dir) / n) for n in OPENCV_PHOTOS]
    found += [(f"skimage/{n}", skimage_data_dir() / n) for n in SKIMAGE_PHOTOS]
    out = []
    for name, path in found:
        if not path.exists():
            continue
        with Image.open(path) as im:
            im = im.convert("RGB")
            if min(im.size) > _MAX_PHOTO_SIDE:
                scale = _MAX_PHOTO_SIDE / min(im.size)
                im = im.resize(
                    (round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS
                )
            out.append(BackgroundPhoto(name, im))
    return tuple(out)


def photos_fingerprint(photos: tuple[BackgroundPhoto, ...]) -> str:
    h = hashlib.sha256()
    for p in photos:
        h.update(f"{p.name}|{p.image.size}".encode())
        h.update(p.image.tobytes())
    return h.hexdigest()


def _colour(rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.integers(0, 256, size=3)]


def sample_background(
    rng: np.random.Generator,
    kind: str,
    photos: tuple[BackgroundPhoto, ...],
) -> dict[str, Any]:
    """A random background spec of the given kind."""
    if kind == "photo":
        if not photos:
            raise VisaeError("no background photos available (scikit-image data files missing?)")
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.image.size
        side = float(rng.uniform(0.35, 1.0)) * min(h, w)
        x0 = float(rng.uniform(0, w - side))
        y0 = float(rng.uniform(0, h - side))
        box = [round(x0, 2), round(y0, 2), round(x0 + side, 2), round(y0 + side, 2)]
        return {"kind": "photo", "photo": photo.name, "box": box, "flip": bool(rng.integers(2))}
    if kind == "texture":
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        spec: dict[str, Any] = {
            "kind": "texture",
            "texture": texture,
            "colors": [_colour(rng), _colour(rng)],
            "period": round(float(rng.uniform(0.04, 0.2)), 4),
            "angle": round(float(rng.uniform(0, np.pi)), 4),
        }
        if texture == "noise":
            spec["seed"] = int(rng.integers(2**31))
        return spec
    if kind == "plain":
        return {"kind": "plain", "color": _colour(rng)}
    raise VisaeError(f"unknown background kind {kind!r} (expected one of {BACKGROUND_KINDS})")


def render_background(
    spec: dict[str, Any], size: int, photos: dict[str, BackgroundPhoto]
) -> np.ndarray:
    """`[size, size, 3]` uint8 pixels of a background spec."""
    kind = spec["kind"]
    if kind == "plain":
        return np.broadcast_to(np.array(spec["color"], np.uint8), (size, size, 3)).copy()
    if kind == "photo":
        photo = photos.get(spec["photo"])
        if photo is None:
            raise VisaeError(f"background photo {spec['photo']!r} is not available on this machine")
        im = photo.image.resize((size, size), Image.Resampling.BILINEAR, box=tuple(spec["box"]))
        out = np.asarray(im)
        return np.ascontiguousarray(out[:, ::-1]) if spec["flip"] else out.copy()
    if kind == "texture":
        return _texture(spec, size)
    raise VisaeError(f"unknown background kind {kind!r}")


def _texture(spec: dict[str, Any], size: int) -> np.ndarray:
    c0 = np.array(spec["colors"][0], np.float32)
    c1 = np.array(spec["colors"][1], np.float32)
    period, angle = float(spec["period"]), float(spec["angle"])
    x = (np.arange(size, dtype=np.float32) / size)[None, :]
    y = (np.arange(size, dtype=np.float32) / size)[:, None]
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = x * cos + y * sin
    v = y * cos - x * sin
    texture = spec["texture"]
    if texture == "stripes":
        t = ((u / period) % 1.0 < 0.5).astype(np.float32)
    elif texture == "checker":
        t = (((np.floor(u / period) + np.floor(v / period)) % 2) == 0).astype(np.float32)
    elif texture == "dots":
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        t = (fu * fu + fv * fv < 0.1).astype(np.float32)
    elif texture == "gradient":
        t = np.clip(u - u.min(), 0, None)
        t = t / max(float(t.max()), 1e-6)
    elif texture == "noise":
        t = _value_noise(int(spec["seed"]), size, period)
    else:
        raise VisaeError(f"unknown texture {texture!r} (expected one of {TEXTURES})")
    out = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _value_noise(seed: int, size: int, period: float) -> np.ndarray:
    """Smooth random field in [0, 1]: a coarse random grid upsampled bicubically."""
    cells = max(2, round(1 / period))
    grid = np.random.default_rng(seed).random((cells, cells)).astype(np.float32)
    im = Image.fromarray(grid, "F").resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(im), 0, 1)
