"""What every downstream head offers interventions: which backbone layer it reads, what it
outputs, and one call that runs it on a forward pass (so edits at earlier layers reach it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from visae.errors import VisaeError

if TYPE_CHECKING:
    from visae.backbones import Backbone

HEAD_KINDS = ("classification", "dense")


class Head(ABC):
    """A readout of a backbone: `classification` heads give `[B, C]` scores per image (logits
    or probabilities, see `outputs`), `dense` heads `[B, C, h, w]` maps over the patch grid.

    `layer` is the backbone layer whose output the head reads (`None`: the model's own output,
    e.g. a classifier's logits); an edit can only change what the head sees when it is made at
    that layer or before it. `labels` name the C outputs.
    """

    name: str
    kind: str
    layer: int | None
    labels: list[str]
    outputs: str  # "logits" | "probabilities"
    # classification heads: one independent yes/no per label (sigmoid) instead of one class
    multilabel: bool = False

    @abstractmethod
    def _read(
        self, backbone: Backbone, recorded: torch.Tensor | None, output: object
    ) -> torch.Tensor:
        """The head's output from the recorded tokens of `layer` (or the model output)."""

    @torch.inference_mode()
    def __call__(self, backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
        """Run the backbone (under any active edits) and the head on preprocessed pixels."""
        if self.layer is None:
            return self._read(backbone, None, backbone.forward(pixels))
        with backbone.recording([self.layer]) as recorded:
            output = backbone.forward(pixels)
        return self._read(backbone, recorded[self.layer], output)

    def check_reads_after(self, layer: int) -> None:
        """Refuse an edit at `layer` that this head cannot see (it reads an earlier layer)."""
        if self.layer is not None and layer > self.layer:
            raise VisaeError(
                f"head {self.name} reads layer {self.layer}: an edit at layer {layer} cannot "
                "change its output"
            )
