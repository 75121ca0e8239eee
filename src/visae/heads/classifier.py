"""`classifier`: EfficientNet-Lite0's own ImageNet-1k classifier, the one real-weight
classification head offline; plus the per-image readouts interventions report (top classes,
the classes whose logits an edit moved most)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from visae.backbones._imagenet_classes import IMAGENET_CLASSES
from visae.backbones.efficientnet import NAME as EFFICIENTNET
from visae.backbones.efficientnet import EfficientNetBackbone
from visae.errors import VisaeError
from visae.heads.base import Head

if TYPE_CHECKING:
    from visae.backbones import Backbone

SCORE_KINDS = ("logits", "probabilities")


def _require_efficientnet(backbone: Backbone) -> None:
    if not isinstance(backbone, EfficientNetBackbone):
        raise VisaeError(
            f"the classifier head is {EFFICIENTNET}'s own; {backbone.name} is not {EFFICIENTNET}"
        )


class ClassifierHead(Head):
    """The backbone's own logits over the 1000 ImageNet classes (`[B, 1000]`): it reads the
    model output, so an edit at any layer reaches it."""

    name = "classifier"
    kind = "classification"
    layer = None
    outputs = "logits"

    def __init__(self, backbone: Backbone) -> None:
        _require_efficientnet(backbone)
        self.labels = list(IMAGENET_CLASSES)

    def _read(
        self, backbone: Backbone, recorded: torch.Tensor | None, output: object
    ) -> torch.Tensor:
        _require_efficientnet(backbone)
        assert isinstance(output, torch.Tensor)  # EfficientNetBackbone.forward returns logits
        return output


def _check_scores(scores_BC: torch.Tensor, labels: Sequence[str], k: int, what: str) -> None:
    if scores_BC.ndim != 2:
        raise VisaeError(f"{what} must be [images, classes], got shape {tuple(scores_BC.shape)}")
    n_classes = scores_BC.shape[1]
    if len(labels) != n_classes:
        raise VisaeError(f"{len(labels)} labels for {n_classes} classes in {what}")
    if not 1 <= k <= n_classes:
        raise VisaeError(f"k={k} is out of range for {n_classes} classes (1..{n_classes})")


def top_classes(
    scores_BC: torch.Tensor, labels: Sequence[str], k: int, outputs: str = "logits"
) -> list[list[dict[str, Any]]]:
    """The k best classes per image, best first: `{"index", "name", "score", "prob"}`, where
    `prob` is the softmax of logits (or the score itself when `outputs` is probabilities)."""
    if outputs not in SCORE_KINDS:
        raise VisaeError(f"outputs must be one of {', '.join(SCORE_KINDS)}, not {outputs!r}")
    _check_scores(scores_BC, labels, k, "scores")
    scores = scores_BC.detach().float().cpu()
    probs = scores.softmax(-1) if outputs == "logits" else scores
    values, indices = scores.topk(k, dim=-1)
    return [
        [
            {"index": int(i), "name": labels[int(i)], "score": float(s), "prob": float(p[i])}
            for s, i in zip(row_s, row_i, strict=True)
        ]
        for row_s, row_i, p in zip(values, indices, probs, strict=True)
    ]


def logit_changes(
    before_BC: torch.Tensor, after_BC: torch.Tensor, labels: Sequence[str], k: int
) -> list[list[dict[str, Any]]]:
    """Per image, the k classes whose logits an edit moved most (by absolute change), largest
    first: `{"index", "name", "before", "after", "change"}` (change = after - before)."""
    if before_BC.shape != after_BC.shape:
        raise VisaeError(
            f"logits before {tuple(before_BC.shape)} and after {tuple(after_BC.shape)} "
            "the edit differ in shape"
        )
    _check_scores(before_BC, labels, k, "logits")
    before = before_BC.detach().float().cpu()
    after = after_BC.detach().float().cpu()
    change = after - before
    _, indices = change.abs().topk(k, dim=-1)
    return [
        [
            {
                "index": int(i),
                "name": labels[int(i)],
                "before": float(b[i]),
                "after": float(a[i]),
                "change": float(c[i]),
            }
            for i in row_i
        ]
        for row_i, b, a, c in zip(indices, before, after, change, strict=True)
    ]
