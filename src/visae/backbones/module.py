"""Any `torch.nn.Module` as a visae backbone: the user names the submodules whose outputs are
the layers and describes the preprocessing; the token layout of each layer is read from its
output on one probe forward pass. Then extraction, training, analysis, evaluation and
interventions take it like a built-in model.

    from visae.backbones import ModuleBackbone, preprocessing
    backbone = ModuleBackbone(net, ["stage1", "stage2", "blocks.3"], preprocessing(224),
                              name="my-cnn")

A layer's output may be a feature map `[batch, channels, h, w]` (a CNN's: h x w patch tokens,
d = channels, no special tokens) or tokens `[batch, tokens, d]` (a ViT's: `n_cls` and
`n_registers` special tokens first, then a square patch grid, or the `grid` given); a tuple
output (some blocks return extras) is read at its first element and rebuilt on edits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from visae.backbones.base import Backbone, TokenLayout
from visae.backbones.preprocess import Preprocessor
from visae.errors import VisaeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing(
    size: int,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resample: str = "bilinear",
) -> Preprocessor:
    """The common recipe: shorter side to `resize` (default `size`), center crop `size`,
    pixels in [0, 1] normalised by `mean` and `std`."""
    if len(mean) != 3 or len(std) != 3:
        raise VisaeError("preprocessing: mean and std need one value per RGB channel")
    return Preprocessor(
        shortest_edge=resize or size,
        resize_hw=None,
        resample=resample,
        crop_hw=(size, size),
        rescale_factor=1 / 255,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        source="given by the user",
    )


class ModuleBackbone(Backbone):
    """A user's model; layer i is the output of the submodule named `layers[i]`."""

    def __init__(
        self,
        module: torch.nn.Module,
        layers: Sequence[str],
        preprocess: Preprocessor,
        name: str,
        n_cls: int = 0,
        n_registers: int = 0,
        grid: tuple[int, int] | None = None,
        forward: Callable[[torch.nn.Module, torch.Tensor], Any] | None = None,
    ) -> None:
        if not layers:
            raise VisaeError("ModuleBackbone: name at least one submodule as a layer")
        named = dict(module.named_modules())
        missing = [n for n in layers if n not in named]
        if missing:
            raise VisaeError(
                f"{name}: no submodule named {missing[0]!r} (see model.named_modules())"
            )
        if not isinstance(preprocess, Preprocessor):
            raise VisaeError(f"{name}: preprocess must be a Preprocessor (see preprocessing())")
        self.name = name
        self._module = module.eval()
        self._blocks = [named[n] for n in layers]
        self.layer_names = list(layers)
        self.n_layers = len(layers)
        self._preprocessor = preprocess
        self._forward = forward or (lambda m, pixels: m(pixels))
        self._special = (n_cls, n_registers)
        self._layouts: list[TokenLayout] = []
        self._widths: list[int] = []
        self._maps: list[bool] = []  # feature map [B, C, h, w] (True) or tokens [B, T, d]
        self._probe(grid)

    def _probe(self, grid: tuple[int, int] | None) -> None:
        h, w = self._preprocessor.output_hw
        outputs: dict[int, Any] = {}

        def keep(k: int) -> Callable[..., None]:
            def hook(_m: torch.nn.Module, _i: Any, out: Any) -> None:  # returns None: no edit
                outputs.setdefault(k, _first(out))

            return hook

        handles = [block.register_forward_hook(keep(k)) for k, block in enumerate(self._blocks)]
        try:
            with torch.inference_mode():
                self._forward(self._module, torch.zeros(1, 3, h, w, device=self.device))
        finally:
            for handle in handles:
                handle.remove()
        for k, name in enumerate(self.layer_names):
            out = outputs.get(k)
            if not isinstance(out, torch.Tensor):
                raise VisaeError(
                    f"{self.name}: submodule {name!r} gave no tensor on a forward pass"
                )
            if out.ndim == 4:
                self._maps.append(True)
                self._widths.append(int(out.shape[1]))
                self._layouts.append(TokenLayout(0, 0, (int(out.shape[2]), int(out.shape[3]))))
            elif out.ndim == 3:
                self._maps.append(False)
                self._widths.append(int(out.shape[2]))
                self._layouts.append(self._token_layout(name, int(out.shape[1]), grid))
            else:
                raise VisaeError(
                    f"{self.name}: submodule {name!r} outputs shape {tuple(out.shape)}; a layer "
                    "is [batch, channels, h, w] or [batch, tokens, d]"
                )

    def _token_layout(self, name: str, n_tokens: int, grid: tuple[int, int] | None) -> TokenLayout:
        n_cls, n_registers = self._special
        patches = n_tokens - n_cls - n_registers
        if grid is None:
            side = math.isqrt(max(patches, 0))
            if side * side != patches or patches == 0:
                raise VisaeError(
                    f"{self.name}: submodule {name!r} has {n_tokens} tokens; with {n_cls} CLS and "
                    f"{n_registers} registers the {patches} left are not a square grid: give grid="
                )
            grid = (side, side)
        if grid[0] * grid[1] != patches:
            raise VisaeError(
                f"{self.name}: grid {grid} holds {grid[0] * grid[1]} patches, but submodule "
                f"{name!r} has {patches} after its special tokens"
            )
        return TokenLayout(n_cls, n_registers, (int(grid[0]), int(grid[1])))

    def d(self, layer: int) -> int:
        self._check_layers([layer])
        return self._widths[layer]

    def layout(self, layer: int) -> TokenLayout:
        self._check_layers([layer])
        return self._layouts[layer]

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def _block(self, layer: int) -> torch.nn.Module:
        return self._blocks[layer]

    def _run(self, pixels: torch.Tensor) -> Any:
        return self._forward(self._module, pixels)

    def _to_tokens(self, layer: int, output: Any) -> torch.Tensor:
        out = _first(output)
        return out.flatten(2).transpose(1, 2) if self._maps[layer] else out

    def _from_tokens(self, layer: int, output: Any, tokens: torch.Tensor) -> Any:
        first = _first(output)
        new = tokens.transpose(1, 2).reshape(first.shape) if self._maps[layer] else tokens
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output
