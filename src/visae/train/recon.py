"""Reconstruction metrics of a trained SAE on a store, by default on the images its trainer held
out, so that the number a user reports is never a training-set number by accident."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from visae.devices import resolve_device
from visae.errors import VisaeError
from visae.pairing import is_training_store, resolve_pair
from visae.sae import SAE
from visae.store import ActivationStore
from visae.train.metrics import evaluate
from visae.train.trainer import heldout_from_record

IMAGE_SETS = ("auto", "heldout", "all")


@dataclass
class ReconReport:
    """What `eval_recon` measured, and on which images."""

    sae: str
    store: str
    layer: int
    tokens: str
    image_set: str
    n_images: int
    metrics: dict[str, Any]

    def summary(self) -> str:
        lines = [
            f"sae       {self.sae}",
            f"store     {self.store}  layer {self.layer}, {self.tokens} tokens",
            f"images    {self.n_images} ({self.image_set})",
        ]
        for key, value in self.metrics.items():
            lines.append(
                f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}"
            )
        return "\n".join(lines)


def choose_images(sae: SAE, store: ActivationStore, images: str) -> tuple[np.ndarray, str]:
    """(store image ids, a description of the set) for `images` in IMAGE_SETS."""
    if images not in IMAGE_SETS:
        raise VisaeError(f"images must be one of {', '.join(IMAGE_SETS)}, not {images!r}")
    own = is_training_store(sae, store)
    record = (sae.checkpoint_info.get("metadata") or {}).get("holdout")
    every = np.arange(store.n_images)
    if images == "all":
        return every, "all images" + (", including the SAE's training images" if own else "")
    if images == "auto" and not own:
        return every, "all images; the store is not the one the SAE was trained on"
    if images == "auto" and (record is None or not record["n_heldout"]):
        why = "records no held-out images" if record else "does not record its held-out images"
        return every, f"all images, training images included: the checkpoint {why}"
    if not own:
        raise VisaeError(
            f"store {store.path} is not the store the SAE was trained on, so it has no "
            "held-out images; use --images all"
        )
    if record is None or not record["n_heldout"]:
        raise VisaeError(
            "the SAE's checkpoint records no held-out images (trained before visae recorded "
            "them, or with holdout_fraction=0); use --images all"
        )
    return heldout_from_record(record), "the images its trainer held out"


def eval_recon(
    sae: SAE | str,
    store: ActivationStore | str | None = None,
    *,
    layer: int | None = None,
    tokens: str | None = None,
    images: str = "auto",
    max_images: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ReconReport:
    """NMSE, explained variance, L0, dead and dense fractions of `sae` on `store` (default: the
    store the SAE was trained on). `images`: "auto" (the held-out images on the SAE's own store,
    every image on another), "heldout" or "all"; `max_images` keeps the first N of the set."""
    sae_name = str(sae)
    if not isinstance(sae, SAE):
        sae = SAE.load(sae)
    if store is None:
        path = (sae.checkpoint_info.get("store") or {}).get("path")
        if not path:
            raise VisaeError("the SAE does not record the store it was trained on; give a store")
        store = path
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store, progress=progress)
    layer, tokens = resolve_pair(sae, store, layer, tokens)
    ids, what = choose_images(sae, store, images)
    if max_images is not None:
        if max_images < 1:
            raise VisaeError(f"max_images must be positive, not {max_images}")
        if max_images < len(ids):
            what += f", the first {max_images}"
        ids = ids[:max_images]
    sae = sae.to(resolve_device(device)).eval()
    batch = 32
    ordered = store.ordered(layer, tokens, batch, images=ids)
    bar = tqdm(
        ordered, total=-(-len(ids) // batch), desc="eval-recon", unit="batch", disable=not progress
    )
    metrics = evaluate(sae, (acts.reshape(-1, acts.shape[-1]) for _, acts in bar))
    return ReconReport(sae_name, str(store.path), layer, tokens, what, len(ids), metrics)
