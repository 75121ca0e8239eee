"""Settings of an evaluation and the inputs it resolved: shared by the orchestration
(`evaluate`) and the scoring (`scoring`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from visae.errors import VisaeError
from visae.eval.codes import parse_rule

if TYPE_CHECKING:
    from visae.data.base import ImageDataset
    from visae.eval.sources import ConceptLabels, PairSet
    from visae.sae import SAE
    from visae.store import ActivationStore

SCHEMA = "visae.evaluation/1"
VARIANTS = ("trained", "frozen", "random")
BASELINES = ("frozen", "random")
# the per-latent tables an evaluation writes and the report reads
LATENT_COLUMNS = (
    "latent",
    "frequency",
    "ms",
    "ms_corrected",
    "dead",
    "concept",
    "concept_f1",
    "locality",
    "lca_depth",
    "coarse",
    "fine",
)
NEURON_COLUMNS = ("neuron", "ms", "ms_corrected")


@dataclass(frozen=True)
class EvalConfig:
    """Every setting of an evaluation; all are recorded in scores.json.

    `concepts`, `pairs`, `taxonomy`: source specs (None: chosen from the store's dataset;
    "none" turns a part off); `encoder`: MS's image encoder (None: `default_encoder`, "none":
    no MS); `image_rule`: how patch codes become image-level binary codes for matching and
    TAPAScore (`visae.eval.codes.parse_rule`); `ms_aggregate`: a latent's image activation
    for MS; `k`: the MATCHScore@k values reported; `patch_images`: most images whose patches
    are scored (seeded sample; pair images always kept); `min_positives`: fewest positive
    images for a concept to be scored.
    """

    concepts: str | None = None
    pairs: str | None = None
    taxonomy: str | None = None
    encoder: str | None = None
    baselines: tuple[str, ...] = BASELINES
    image_rule: str = "quantile:0.9"
    ms_aggregate: str = "max"
    k: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    betas: tuple[float, ...] = (0.25, 0.5, 1.0)
    headline_k: int = 3
    min_positives: int = 5
    top_images: int = 16
    patch_images: int = 2000
    n_resamples: int = 1000
    level: float = 0.95
    seed: int = 0
    batch_images: int = 32
    omp: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise VisaeError(f"unknown baselines {sorted(unknown)}: choose from frozen, random")
        parse_rule(self.image_rule)
        if self.ms_aggregate not in ("max", "mean"):
            raise VisaeError(f"ms_aggregate must be max or mean, not {self.ms_aggregate!r}")
        if not self.k or min(self.k) < 1 or self.headline_k not in self.k:
            raise VisaeError(f"k values {self.k} must be positive and include {self.headline_k}")
        for name in ("min_positives", "top_images", "n_resamples", "batch_images"):
            if getattr(self, name) < 1:
                raise VisaeError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.top_images < 2:
            raise VisaeError("top_images must be at least 2 (pairs of top images)")


@dataclass
class EvalInputs:
    """What an evaluation resolved from its arguments, before any code is computed."""

    sae: SAE
    store: ActivationStore
    layer: int
    tokens: str
    dataset: ImageDataset | None
    concepts: ConceptLabels
    pairs: PairSet | None
    eval_images: np.ndarray
    patch_images: np.ndarray
    paths: Any
    meta: list[dict[str, Any]]


def finite_json(obj: Any) -> Any:
    """JSON-able copy with NaN and infinities as null and numpy scalars as Python numbers
    (the evaluation's and the intervention study's documents)."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
