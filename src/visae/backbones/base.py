"""The one interface every vision model goes through: token layout, preprocessing,
recording the residual stream after chosen blocks, and editing it in place."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from visae.backbones.identity import weights_sha256
from visae.backbones.preprocess import Preprocessor
from visae.errors import VisaeError

EditFn = Callable[[torch.Tensor], torch.Tensor]

TOKEN_KINDS = ("cls", "register", "patch")


@dataclass(frozen=True)
class TokenLayout:
    """Order of tokens in a recorded `[batch, tokens, d]` tensor: CLS first (if any),
    then registers, then the patch grid in row-major order."""

    n_cls: int
    n_registers: int
    grid: tuple[int, int]

    @property
    def n_special(self) -> int:
        return self.n_cls + self.n_registers

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_special + self.n_patches

    def kinds(self) -> list[str]:
        return ["cls"] * self.n_cls + ["register"] * self.n_registers + ["patch"] * self.n_patches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLayout:
        return cls(int(d["n_cls"]), int(d["n_registers"]), (int(d["grid"][0]), int(d["grid"][1])))


class Backbone(ABC):
    """A vision model seen as a stack of blocks whose outputs are token grids.

    Layers are block indices `0..n_layers-1`; layer `i` is the residual stream after block `i`
    (for CNNs, the feature map after stage `i`, flattened to a patch grid with no special tokens).
    """

    name: str
    n_layers: int
    _preprocessor: Preprocessor

    @abstractmethod
    def d(self, layer: int) -> int:
        """Width of the recorded stream at `layer`."""

    @abstractmethod
    def layout(self, layer: int) -> TokenLayout:
        """Token layout of the recorded stream at `layer`."""

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> `[batch, 3, H, W]` pixels, as the model's own config prescribes."""
        return self._preprocessor(images)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """JSON-able description of `preprocess`, stored in every artifact."""
        return self._preprocessor.to_dict()

    @property
    def weights_hash(self) -> str:
        """Stable hash of the weights: the model's identity in every artifact. Recomputed on
        each access, so it always matches the weights."""
        return weights_sha256(self.module)

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The underlying torch module (for `.to(device)` and heads)."""

    @abstractmethod
    def _block(self, layer: int) -> torch.nn.Module:
        """The module whose output is the stream at `layer`."""

    @abstractmethod
    def _run(self, pixels: torch.Tensor) -> Any:
        """A full forward pass of the model on preprocessed pixels."""

    @abstractmethod
    def _to_tokens(self, layer: int, output: Any) -> torch.Tensor:
        """A block's raw output -> `[batch, tokens, d]`."""

    @abstractmethod
    def _from_tokens(self, layer: int, output: Any, tokens: torch.Tensor) -> Any:
        """`[batch, tokens, d]` -> a block output of the raw form, carrying any extra outputs."""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        self.module.to(device)
        return self

    def _check_layers(self, layers: Sequence[int]) -> None:
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise VisaeError(
                    f"layer {layer} is out of range for {self.name} (0..{self.n_layers - 1})"
                )

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> Any:
        """The model's own output (e.g. logits of a classifier), under any active edits."""
        return self._run(pixels.to(self.device))

    @torch.inference_mode()
    def record(self, pixels: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """One forward pass; the stream after each block in `layers` as `[batch, tokens, d]`.

        Composes with `edit`: a recorded layer at or after an edited one sees the edit.
        """
        with self.recording(layers) as recorded:
            self._run(pixels.to(self.device))
        return dict(recorded)

    @contextlib.contextmanager
    def recording(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Record the stream at `layers` during any forward passes inside the block."""
        self._check_layers(layers)
        recorded: dict[int, torch.Tensor] = {}
        handles = []
        for layer in sorted(set(layers)):

            def hook(_m: torch.nn.Module, _i: Any, out: Any, layer: int = layer) -> None:
                recorded[layer] = self._to_tokens(layer, out).detach()

            handles.append(self._block(layer).register_forward_hook(hook))
        try:
            yield recorded
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def edit(self, layer: int, fn: EditFn) -> Iterator[None]:
        """Replace the stream after block `layer` by `fn(stream)` (`[batch, tokens, d]`)
        during forward passes inside the block."""
        self._check_layers([layer])

        def hook(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
            tokens = self._to_tokens(layer, out)
            edited = fn(tokens)
            if edited.shape != tokens.shape:
                raise VisaeError(
                    f"edit fn changed the stream's shape at layer {layer}: "
                    f"{tuple(tokens.shape)} -> {tuple(edited.shape)}"
                )
            return self._from_tokens(layer, out, edited)

        # prepend: a recording at the same layer sees the edited stream, whatever the nesting order
        handle = self._block(layer).register_forward_hook(hook, prepend=True)
        try:
            yield
        finally:
            handle.remove()
