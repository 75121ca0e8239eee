"""The one check that an SAE may be run on a store, and the layer and tokens to run it on.

Every consumer of an (SAE, store) pair (reconstruction metrics, the analysis pass, and the
evaluations and interventions to come) goes through `resolve_pair`, so the defaults and the
refusals are the same everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visae.errors import VisaeError
from visae.store.format import TOKEN_CHOICES

if TYPE_CHECKING:
    from visae.sae import SAE
    from visae.store import ActivationStore


def trained_tokens(sae: SAE) -> str | None:
    """The token kinds ("patch", "cls", "all") the SAE's checkpoint says it was trained on."""
    tokens = (sae.checkpoint_info.get("metadata") or {}).get("tokens")
    return str(tokens) if tokens in TOKEN_CHOICES else None


def resolve_pair(
    sae: SAE, store: ActivationStore, layer: int | None = None, tokens: str | None = None
) -> tuple[int, str]:
    """(layer, tokens) to run `sae` on `store`: by default the layer and tokens the SAE was
    trained on (else the store's only layer, and patch tokens). Refuses a store of another
    model's weights, a layer the store lacks, and a width that differs."""
    info = sae.checkpoint_info
    trained_on = info.get("store") or {}
    want, have = trained_on.get("weights_hash"), store.backbone.get("weights_hash")
    if want and have and want != have:
        raise VisaeError(
            f"the SAE was trained on activations of another model (weights {str(want)[:12]}) "
            f"than store {store.path} holds ({str(have)[:12]})"
        )
    if layer is None and info.get("layer") is not None:
        layer = int(info["layer"])
    if layer is None:
        if len(store.layers) != 1:
            raise VisaeError(
                f"the SAE does not record its layer and store {store.path} has layers "
                f"{store.layers}; pass the layer (--layer)"
            )
        layer = store.layers[0]
    if layer not in store.layers:
        raise VisaeError(f"layer {layer} is not in store {store.path} (layers {store.layers})")
    if sae.d != store.d(layer):
        raise VisaeError(
            f"SAE width d={sae.d} does not match store {store.path} layer {layer} "
            f"width d={store.d(layer)}"
        )
    tokens = tokens or trained_tokens(sae) or "patch"
    if tokens not in TOKEN_CHOICES:
        raise VisaeError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, not {tokens!r}")
    return int(layer), tokens


def is_training_store(sae: SAE, store: ActivationStore) -> bool:
    """Whether `store` holds the data the SAE was trained on (same model weights, dataset and
    image count; its folder may have moved)."""
    trained_on = sae.checkpoint_info.get("store") or {}
    have = store.identity()
    keys = ("weights_hash", "dataset_fingerprint", "n_images")
    return bool(trained_on) and all(trained_on.get(k) == have.get(k) for k in keys)
