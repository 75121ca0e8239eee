"""Deterministic image preprocessing read from a model's own processor config.

We re-implement resize / center-crop / rescale / normalise (the steps of Hugging Face's PIL image
processors) instead of calling the processors, so the exact transform is ours, the same on every
`transformers` version, and fully described by a JSON dict stored in every artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from visae.errors import VisaeError
from visae.geometry import RESAMPLE, model_view

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

# PIL's integer codes, as stored in `preprocessor_config.json` files
_RESAMPLE_BY_CODE = {
    0: "nearest",
    1: "lanczos",
    2: "bilinear",
    3: "bicubic",
    4: "box",
    5: "hamming",
}


@dataclass(frozen=True)
class Preprocessor:
    """PIL images -> `[batch, 3, H, W]` float32 pixels.

    Steps, in order: convert to RGB; resize (either the shorter side to `shortest_edge`, keeping
    the aspect ratio with the longer side floored, or to exactly `resize_hw`); center-crop to
    `crop_hw` (top-left corner at `(size - crop) // 2`, zero-padded if the image is smaller);
    multiply by `rescale_factor`; subtract `mean` and divide by `std` per channel.
    """

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    resample: str
    crop_hw: tuple[int, int] | None
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def __post_init__(self) -> None:
        if self.shortest_edge is not None and self.resize_hw is not None:
            raise VisaeError("preprocessing: give either shortest_edge or resize_hw, not both")
        if self.resample not in RESAMPLE:
            raise VisaeError(
                f"preprocessing: unknown resample {self.resample!r} (known: {', '.join(RESAMPLE)})"
            )
        if self.crop_hw is None and self.resize_hw is None:
            raise VisaeError(
                f"preprocessing from {self.source} gives images of varying size "
                "(no fixed resize and no center crop); a fixed token grid needs a fixed size"
            )

    @property
    def output_hw(self) -> tuple[int, int]:
        """Height and width of every preprocessed image."""
        size = self.crop_hw if self.crop_hw is not None else self.resize_hw
        assert size is not None  # guaranteed by __post_init__
        return size

    def at_size(self, size: int) -> Preprocessor:
        """The same steps for `size` x `size` output: the resize scaled by the same factor as the
        crop (DINOv2's 256 -> 224 becomes 128 -> 112), for models that take any input size."""
        from dataclasses import replace

        if size < 1:
            raise VisaeError(f"image size must be positive, not {size}")
        h, w = self.output_hw
        if h != w:
            raise VisaeError(f"preprocessing gives {h}x{w} images: a square size cannot be set")
        edge = None if self.shortest_edge is None else round(self.shortest_edge * size / h)
        return replace(
            self,
            shortest_edge=edge,
            resize_hw=None if self.resize_hw is None else (size, size),
            crop_hw=None if self.crop_hw is None else (size, size),
            source=f"{self.source}, at {size} px",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, enough to redo the transform exactly."""
        resize: dict[str, int] | None = None
        if self.shortest_edge is not None:
            resize = {"shortest_edge": self.shortest_edge}
        elif self.resize_hw is not None:
            resize = {"height": self.resize_hw[0], "width": self.resize_hw[1]}
        return {
            "resize": resize,
            "resample": self.resample,
            "center_crop": list(self.crop_hw) if self.crop_hw is not None else None,
            "rescale_factor": self.rescale_factor,
            "mean": list(self.mean),
            "std": list(self.std),
            "output_size": list(self.output_hw),
            "source": self.source,
        }

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image -> `[3, H, W]` float32."""
        image = model_view(image, self.to_dict())
        x = np.asarray(image, dtype=np.float32) * np.float32(self.rescale_factor)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if len(images) == 0:
            raise VisaeError("preprocess: got an empty list of images")
        return torch.from_numpy(np.stack([self.pixels(im) for im in images]))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str) -> Preprocessor:
        """Read a Hugging Face `preprocessor_config.json` dict (keys of its image processors)."""
        if cfg.get("do_pad"):
            raise VisaeError(f"{source}: padding (do_pad) is not supported")
        do_crop = bool(cfg.get("do_center_crop", False))
        shortest_edge: int | None = None
        resize_hw: tuple[int, int] | None = None
        if cfg.get("do_resize", True):
            size = _drop_none(cfg.get("size"))
            if isinstance(size, int):
                # legacy integer size: the shorter side when a crop follows, else a square
                if do_crop:
                    shortest_edge = size
                else:
                    resize_hw = (size, size)
            elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
                shortest_edge = int(size["shortest_edge"])
            elif isinstance(size, dict) and set(size) == {"height", "width"}:
                resize_hw = (int(size["height"]), int(size["width"]))
            else:
                raise VisaeError(f"{source}: unsupported resize size {size!r}")
        crop_hw: tuple[int, int] | None = None
        if do_crop:
            crop = _drop_none(cfg.get("crop_size"))
            if isinstance(crop, int):
                crop_hw = (crop, crop)
            elif isinstance(crop, dict) and {"height", "width"} <= set(crop):
                crop_hw = (int(crop["height"]), int(crop["width"]))
            else:
                raise VisaeError(f"{source}: unsupported crop_size {crop!r}")
        resample = cfg.get("resample", 2)
        if resample not in _RESAMPLE_BY_CODE:
            raise VisaeError(f"{source}: unknown resample code {resample!r}")
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        if cfg.get("do_normalize", True):
            mean = _triple(cfg.get("image_mean"), source)
            std = _triple(cfg.get("image_std"), source)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(
            shortest_edge=shortest_edge,
            resize_hw=resize_hw,
            resample=_RESAMPLE_BY_CODE[resample],
            crop_hw=crop_hw,
            rescale_factor=rescale,
            mean=mean,
            std=std,
            source=source,
        )


def _triple(values: Any, source: str) -> tuple[float, float, float]:
    if isinstance(values, int | float):
        return (float(values),) * 3
    if isinstance(values, list | tuple) and len(values) == 3:
        return (float(values[0]), float(values[1]), float(values[2]))
    raise VisaeError(f"{source}: image_mean/image_std must have 3 values, got {values!r}")


def _drop_none(value: Any) -> Any:
    """Size dicts written by some versions carry unused keys set to null."""
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
