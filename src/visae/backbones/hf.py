"""Hugging Face `transformers` vision transformers: DINOv2 (with or without registers), the CLIP
and SigLIP vision towers, and ViT. Hub ids and local directories both go through
`from_pretrained`; the family is chosen from the config's `model_type`."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from visae.backbones.base import Backbone, TokenLayout
from visae.backbones.preprocess import (
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocessor,
)
from visae.errors import VisaeError, first_line


class ModelNotFoundError(VisaeError):
    """No model config could be read from the given hub id or directory."""


@dataclass(frozen=True)
class Family:
    """What differs between ViT families: special tokens, the vision tower to load, and the
    preprocessing to fall back on when a checkpoint ships no `preprocessor_config.json`."""

    name: str
    has_cls: bool
    registers_attr: str | None  # config attribute holding the number of register tokens
    vision_tower: str  # "auto": AutoModel is the vision model; else the class to load
    fixed_size: bool  # position embeddings are not interpolated: input size must be the config's
    crop: bool  # fallback: resize the shorter side then center-crop (else resize to a square)
    crop_ratio: float  # fallback: shorter side = round(image_size * crop_ratio) before the crop
    resample: str  # fallback: resampling filter
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # extra `from_pretrained` arguments: drop parts that checkpoints may lack (ViT's pooler),
    # since missing weights would be random and change from one load to the next
    load_kwargs: tuple[tuple[str, Any], ...] = ()


_DINOV2 = Family(
    name="dinov2",
    has_cls=True,
    registers_attr=None,
    vision_tower="auto",
    fixed_size=False,
    crop=True,
    crop_ratio=256 / 224,
    resample="bicubic",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
)
_DINOV2_REG = replace(_DINOV2, name="dinov2_with_registers", registers_attr="num_register_tokens")
_CLIP = Family(
    name="clip",
    has_cls=True,
    registers_attr=None,
    vision_tower="CLIPVisionModel",
    fixed_size=True,
    crop=True,
    crop_ratio=1.0,
    resample="bicubic",
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
)
_SIGLIP = Family(
    name="siglip",
    has_cls=False,
    registers_attr=None,
    vision_tower="SiglipVisionModel",
    fixed_size=True,
    crop=False,
    crop_ratio=1.0,
    resample="bicubic",
    mean=HALF_MEAN,
    std=HALF_STD,
)
_VIT = Family(
    name="vit",
    has_cls=True,
    registers_attr=None,
    vision_tower="auto",
    fixed_size=True,
    crop=False,
    crop_ratio=1.0,
    resample="bilinear",
    mean=HALF_MEAN,
    std=HALF_STD,
    load_kwargs=(("add_pooling_layer", False),),
)

FAMILIES: dict[str, Family] = {
    "dinov2": _DINOV2,
    "dinov2_with_registers": _DINOV2_REG,
    "clip": _CLIP,
    "clip_vision_model": _CLIP,
    "siglip": _SIGLIP,
    "siglip_vision_model": _SIGLIP,
    "vit": _VIT,
}

# where the list of transformer blocks lives, across transformers versions and tower layouts
_LAYER_PATHS = (
    "encoder.layer",
    "encoder.layers",
    "layers",
    "vision_model.encoder.layers",
    "vision_model.encoder.layer",
)


def _vision_config(config: Any) -> Any:
    """The vision part of a (possibly two-tower) config."""
    return getattr(config, "vision_config", None) or config


def _find_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for path in _LAYER_PATHS:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise VisaeError(f"cannot find the transformer blocks of {type(model).__name__}")


def fallback_preprocessor(family: Family, vision_config: Any) -> Preprocessor:
    """Preprocessing from the model config's image size and the family's standard statistics."""
    size = int(vision_config.image_size)
    source = f"defaults for {family.name} (image_size {size} from config.json)"
    if family.crop:
        return Preprocessor(
            shortest_edge=round(size * family.crop_ratio),
            resize_hw=None,
            resample=family.resample,
            crop_hw=(size, size),
            rescale_factor=1 / 255,
            mean=family.mean,
            std=family.std,
            source=source,
        )
    return Preprocessor(
        shortest_edge=None,
        resize_hw=(size, size),
        resample=family.resample,
        crop_hw=None,
        rescale_factor=1 / 255,
        mean=family.mean,
        std=family.std,
        source=source,
    )


class HFBackbone(Backbone):
    """A `transformers` ViT. Layer `i` is the output of encoder block `i` (the residual stream
    before any final layernorm), i.e. `hidden_states[i + 1]` of `output_hidden_states=True`."""

    def __init__(
        self, model: torch.nn.Module, family: Family, preprocessor: Preprocessor, name: str
    ) -> None:
        self.name = name
        self.family = family
        self._model = model.eval()
        self._layers = _find_layers(model)
        self.n_layers = len(self._layers)
        self._preprocessor = preprocessor
        vcfg = _vision_config(model.config)
        self._d = int(vcfg.hidden_size)
        patch = int(vcfg.patch_size)
        h, w = preprocessor.output_hw
        if family.fixed_size and (h, w) != (vcfg.image_size, vcfg.image_size):
            raise VisaeError(
                f"{name}: preprocessing gives {h}x{w} images but the {family.name} model "
                f"expects {vcfg.image_size}x{vcfg.image_size}"
            )
        n_reg = int(getattr(vcfg, family.registers_attr)) if family.registers_attr else 0
        self._layout = TokenLayout(int(family.has_cls), n_reg, (h // patch, w // patch))

    def d(self, layer: int) -> int:
        self._check_layers([layer])
        return self._d

    def layout(self, layer: int) -> TokenLayout:
        self._check_layers([layer])
        return self._layout

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def _block(self, layer: int) -> torch.nn.Module:
        return self._layers[layer]

    def _run(self, pixels: torch.Tensor) -> Any:
        return self._model(pixel_values=pixels)

    def _to_tokens(self, layer: int, output: Any) -> torch.Tensor:
        # older transformers return (hidden_states, attentions, ...) from each block
        return output[0] if isinstance(output, tuple) else output

    def _from_tokens(self, layer: int, output: Any, tokens: torch.Tensor) -> Any:
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens


def _preprocessor_for(spec: str, name: str, family: Family, vision_config: Any) -> Preprocessor:
    """The checkpoint's own `preprocessor_config.json` when present, else the family defaults."""
    from transformers.utils import cached_file

    path = cached_file(
        spec,
        "preprocessor_config.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:
        return fallback_preprocessor(family, vision_config)
    with open(path) as f:
        cfg = json.load(f)
    return Preprocessor.from_hf_dict(cfg, source=f"preprocessor_config.json of {name}")


def load_hf_backbone(spec: str, name: str | None = None) -> HFBackbone:
    """Load a hub id or a local directory with `from_pretrained` and wrap it by `model_type`."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"cannot read a model config from {spec!r}: {first_line(e)}"
        ) from e
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        return load_llava_tower(spec, config, name)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise VisaeError(
            f"{spec}: unsupported model_type {model_type!r} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    # two-tower checkpoints (clip, siglip) load only their vision tower
    cls = (
        transformers.AutoModel
        if family.vision_tower == "auto"
        else getattr(transformers, family.vision_tower)
    )
    # transformers draws a per-tensor progress bar even for a local 22M-parameter model
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            spec, output_loading_info=True, **dict(family.load_kwargs)
        )
    except (OSError, ValueError) as e:
        raise VisaeError(f"cannot load model weights from {spec!r}: {first_line(e)}") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise VisaeError(
            f"{spec}: the checkpoint lacks {len(missing)} weights of {type(model).__name__} "
            f"(e.g. {', '.join(missing[:3])}); they would be random"
        )
    return _wrap(model, family, spec, name)


def _wrap(model: torch.nn.Module, family: Family, spec: str, name: str | None) -> HFBackbone:
    """A loaded vision model as a float32 backbone named by its spec, with the spec's own
    preprocessing."""
    model = model.float().eval()
    if name is None:
        name = str(Path(spec).resolve()) if Path(spec).is_dir() else spec
    preprocessor = _preprocessor_for(spec, name, family, _vision_config(model.config))
    return HFBackbone(model, family, preprocessor, name)


# where a LLaVA checkpoint keeps its vision tower's tensors (transformers >= 4.52, then older)
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")


def load_llava_tower(spec: str, config: Any, name: str | None = None) -> HFBackbone:
    """The vision tower of a LLaVA checkpoint (`llava-hf/llava-1.5-7b-hf`, or a local folder),
    reading only the tower's tensors from its safetensors files, with the checkpoint's own image
    preprocessing: what its projector sees, so a store made here pairs with `visae steer`."""
    import transformers
    from safetensors import safe_open
    from transformers.utils import cached_file

    vision_config = config.vision_config
    family = FAMILIES.get(str(vision_config.model_type))
    if family is None:
        raise VisaeError(f"{spec}: unsupported LLaVA vision tower {vision_config.model_type!r}")
    index = cached_file(
        spec,
        "model.safetensors.index.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(_TOWER_PREFIXES)})
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            path = cached_file(spec, shard)
        except OSError as e:
            raise VisaeError(f"cannot read {shard} of {spec!r}: {first_line(e)}") from e
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                prefix = next((p for p in _TOWER_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix) :]] = f.get_tensor(key)
    if not state:
        raise VisaeError(f"{spec}: no vision tower tensors ({' or '.join(_TOWER_PREFIXES)}*)")
    model = transformers.AutoModel.from_config(vision_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VisaeError(
            f"{spec}: the vision tower's tensors do not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return _wrap(model, family, spec, name)
