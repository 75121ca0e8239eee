"""Activation stores: a directory of `.npy` shards `[images, tokens, d]` per layer plus a
manifest that says exactly what produced them. Written atomically and resumably
(`StoreWriter`, `extract`), read ordered, shuffled, sampled or at random (`ActivationStore`);
the images behind a store reopen with `open_dataset`."""

from visae.store.dataset import open_dataset
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
    "open_dataset",
    "store_spec",
]
