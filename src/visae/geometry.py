"""The geometric half of a backbone's preprocessing — resize, then center crop — read from the
JSON `preprocessing` dict that every store and analysis records. One implementation serves the
backbone's own transform, patch labels and thumbnails, so all three agree on the pixels."""

from __future__ import annotations

from typing import Any

from PIL import Image

from visae.errors import VisaeError

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resized_size(preprocessing: dict[str, Any], width: int, height: int) -> tuple[int, int]:
    """(width, height) after the resize step: the shorter side to `shortest_edge` (the longer
    one floored, keeping the aspect ratio), or exactly `height` x `width`, or unchanged."""
    resize = preprocessing.get("resize")
    if not resize:
        return width, height
    if "shortest_edge" in resize:
        edge = int(resize["shortest_edge"])
        if width <= height:
            return edge, int(edge * height / width)
        return int(edge * width / height), edge
    if {"height", "width"} <= set(resize):
        return int(resize["width"]), int(resize["height"])
    raise VisaeError(f"preprocessing resize {resize!r} not understood")


def crop_window(
    preprocessing: dict[str, Any], width: int, height: int
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the center crop in a resized `width` x `height` image;
    the whole image without a crop. The window may reach outside a too-small image."""
    crop = preprocessing.get("center_crop")
    if not crop:
        return 0, 0, width, height
    ch, cw = int(crop[0]), int(crop[1])
    top, left = (height - ch) // 2, (width - cw) // 2
    return left, top, left + cw, top + ch


def model_view(image: Image.Image, preprocessing: dict[str, Any]) -> Image.Image:
    """The RGB image after resize and center crop (PIL fills any part of the crop outside the
    image with zeros), before rescaling and normalisation."""
    resample = RESAMPLE.get(str(preprocessing.get("resample", "bilinear")))
    if resample is None:
        raise VisaeError(f"preprocessing has unknown resample {preprocessing['resample']!r}")
    image = image.convert("RGB")
    new_w, new_h = resized_size(preprocessing, *image.size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample)
    window = crop_window(preprocessing, new_w, new_h)
    if window != (0, 0, new_w, new_h):
        image = image.crop(window)
    return image


def preprocessing_box(
    preprocessing: dict[str, Any], width: int, height: int
) -> tuple[float, float, float, float]:
    """Region `(x0, y0, x1, y1)` of a `width` x `height` original image that the model's input
    covers; pass it as `box` to patch labels so they line up with the model's token grid."""
    new_w, new_h = resized_size(preprocessing, width, height)
    left, top, right, bottom = crop_window(preprocessing, new_w, new_h)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, right * sx, bottom * sy)
