"""The images a participant sees, as PNG bytes: an analysis's thumbnail (the model's view of the
image, so a click's fraction of its width and height is a fraction of the token grid), with the
feature's activation map over it for references and feedback, and the attention checks' noise
images with their green circle."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

CHECK_SIZE = 160


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def with_heatmap(image: Image.Image, activation: np.ndarray) -> Image.Image:
    """`activation` ([h, w] patches) over the image: patches dimmed where the feature is silent,
    tinted from red to yellow as it approaches its maximum on this image."""
    import matplotlib

    rgb = np.asarray(image.convert("RGB"), np.float32) / 255
    peak = float(activation.max())
    norm = activation / peak if peak > 0 else np.zeros_like(activation)
    grid = Image.fromarray((norm * 255).astype(np.uint8)).resize(
        image.size, Image.Resampling.NEAREST
    )
    level = np.asarray(grid, np.float32)[..., None] / 255
    colour = matplotlib.colormaps["autumn"](level[..., 0])[..., :3]
    alpha = 0.65 * level
    out = (rgb * 0.45 * (1 - level) + rgb * level) * (1 - alpha) + colour * alpha
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


@lru_cache(maxsize=256)
def check_image(seed: int, cx: float, cy: float, r: float) -> bytes:
    """Grey noise with one green circle at (cx, cy), radius r (fractions of the side)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(90, 170, (CHECK_SIZE // 8, CHECK_SIZE // 8), dtype=np.uint8)
    image = Image.fromarray(noise).resize((CHECK_SIZE, CHECK_SIZE)).convert("RGB")
    s = CHECK_SIZE
    box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
    ImageDraw.Draw(image).ellipse(box, fill=(40, 200, 60), outline=(255, 255, 255), width=2)
    return png(image)
