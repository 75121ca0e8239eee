"""Thumbnails of exactly the region the model saw, so a patch map drawn over one lines up with
the pixels that produced it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from visae.errors import VisaeError
from visae.geometry import model_view


def make_thumbnail(image: Image.Image, preprocessing: dict[str, Any], size: int) -> Image.Image:
    """The model's view scaled so its longer side is `size` pixels."""
    view = model_view(image, preprocessing)
    w, h = view.size
    scale = size / max(w, h)
    return view.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )


def image_loader(
    metadata: list[dict[str, Any]], dataset: Any | None
) -> Callable[[int], Image.Image]:
    """A function store image id -> PIL image: from the dataset when given (at the
    `dataset_index` the store's metadata records, which differs from the store's own index
    after skipped images), else from the `source` file path of the store's metadata."""
    if dataset is not None:
        return lambda i: dataset.image(int(metadata[i].get("dataset_index", i)))

    def from_source(i: int) -> Image.Image:
        source = metadata[i].get("source")
        if not source or not Path(source).is_file():
            raise VisaeError(
                f"image {i}: its store source {source!r} is not a file; pass the dataset the "
                "store was extracted from to render thumbnails"
            )
        try:
            with Image.open(source) as im:
                return im.convert("RGB")
        except OSError as e:
            raise VisaeError(f"image {i}: cannot read {source}: {e}") from None

    return from_source
