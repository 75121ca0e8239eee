"""Activation stores: a directory of `.npy` shards `[images, tokens, d]` per layer plus a
manifest that says exactly what produced them. Written atomically and resumably
(`StoreWriter`, `extract`), read ordered, shuffled or at random (`ActivationStore`)."""

from visae.store.extract import extract, store_spec
from visae.store.format import SCHEMA_VERSION
from visae.store.reader import ActivationStore
from visae.store.writer import LayerSpec, StoreSpec, StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "ActivationStore",
    "LayerSpec",
    "StoreSpec",
    "StoreWriter",
    "extract",
    "store_spec",
]
