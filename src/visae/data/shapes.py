"""Procedural shapes (circles, stars, polygons in six colours and four fills): an object source
with exact masks that needs no system package, used when the Tux Paint photos are missing."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from visae.data.stamps import ObjectStamp, StampSet, make_stamp_set

SHAPES: dict[str, str] = {
    "circle": "round",
    "ellipse": "round",
    "ring": "round",
    "triangle": "polygon",
    "square": "polygon",
    "pentagon": "polygon",
    "hexagon": "polygon",
    "star4": "star",
    "star5": "star",
    "star8": "star",
    "plus": "cross",
    "x": "cross",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 40),
    "green": (50, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
FILLS = ("solid", "striped", "dotted", "gradient")
_SUPERSAMPLE = 4


def _polygon(n: int, r: float, c: float, rotation: float) -> list[tuple[float, float]]:
    return [
        (
            c + r * math.cos(rotation + 2 * math.pi * k / n),
            c + r * math.sin(rotation + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star(points: int, r_out: float, r_in: float, c: float) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + math.pi * k / points
        out.append((c + r * math.cos(a), c + r * math.sin(a)))
    return out


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Antialiased coverage `[size, size]` uint8 of one shape, drawn 4x larger then reduced."""
    s = size * _SUPERSAMPLE
    c, r = s / 2, s * 0.48
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif shape == "ellipse":
        d.ellipse((c - r, c - r * 0.55, c + r, c + r * 0.55), fill=255)
    elif shape == "ring":
        d.ellipse((c - r, c - r, c + r, c + r), fill=255)
        d.ellipse((c - r * 0.55, c - r * 0.55, c + r * 0.55, c + r * 0.55), fill=0)
    elif shape == "triangle":
        d.polygon(_polygon(3, r, c, -math.pi / 2), fill=255)
    elif shape == "square":
        d.polygon(_polygon(4, r, c, math.pi / 4), fill=255)
    elif shape == "pentagon":
        d.polygon(_polygon(5, r, c, -math.pi / 2), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, r, c, 0.0), fill=255)
    elif shape.startswith("star"):
        points = int(shape[4:])
        d.polygon(_star(points, r, r * (0.4 if points < 8 else 0.55), c), fill=255)
    elif shape == "plus":
        w = r * 0.35
        d.rectangle((c - w, c - r, c + w, c + r), fill=255)
        d.rectangle((c - r, c - w, c + r, c + w), fill=255)
    elif shape == "x":
        w = r * 0.35
        for sign in (1, -1):
            d.polygon(
                [
                    (c - r + w, c - sign * r),
                    (c + r, c + sign * (r - w)),
                    (c + r - w, c + sign * r),
                    (c - r, c - sign * (r - w)),
                ],
                fill=255,
            )
    else:
        raise ValueError(shape)
    return np.asarray(im.resize((size, size), Image.Resampling.BOX))


def _fill(fill: str, colour: tuple[int, int, int], size: int) -> np.ndarray:
    base = np.array(colour, np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if fill == "solid":
        shade = np.ones((size, size), np.float32)
    elif fill == "striped":
        shade = np.where(((xx + yy) * 8) % 1.0 < 0.5, 1.0, 0.45).astype(np.float32)
    elif fill == "dotted":
        fx, fy = (xx * 6) % 1.0 - 0.5, (yy * 6) % 1.0 - 0.5
        shade = np.where(fx * fx + fy * fy < 0.09, 0.35, 1.0).astype(np.float32)
    elif fill == "gradient":
        shade = (0.35 + 0.65 * (1 - yy)).astype(np.float32)
    else:
        raise ValueError(fill)
    return np.clip(base[None, None, :] * shade[..., None], 0, 255)


@functools.lru_cache(maxsize=2)
def procedural_shapes(size: int = 128) -> StampSet:
    """12 shapes x 6 colours x 4 fills = 288 objects; category `shapes/<family>/<shape>`,
    item `shapes/<family>/<shape>/<colour>-<fill>`."""
    stamps = []
    for shape, family in SHAPES.items():
        alpha = shape_mask(shape, size)
        for colour, rgb in COLOURS.items():
            for fill in FILLS:
                pixels = _fill(fill, rgb, size).round().astype(np.uint8)
                rgba = np.concatenate([pixels, alpha[..., None]], axis=-1)
                ys, xs = np.nonzero(alpha >= 128)
                rgba = np.ascontiguousarray(rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
                stamps.append(
                    ObjectStamp(
                        item=f"shapes/{family}/{shape}/{colour}-{fill}",
                        caption=f"A {colour} {fill} {shape}.",
                        rgba=rgba,
                        source="procedural",
                        hue_shiftable=True,
                    )
                )
    return make_stamp_set("shapes", stamps)
