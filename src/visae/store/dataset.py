"""Reopening the images a store was extracted from: the one way every consumer (analysis
thumbnails, patch labels, the browser) finds them, checked to be the same images."""

from __future__ import annotations

import re

from visae.data import load_dataset
from visae.data.base import ImageDataset
from visae.errors import VisaeError
from visae.store.reader import ActivationStore

# dataset names that are not their own spec, from stores written before specs were recorded
_NAME_SPECS = {"skimage-photos": "skimage", "scenes-shapes": "scenes:shapes"}
_SUBSET_NAME = re.compile(r"^(.+)\[(\d+)\]$")


def spec_from_name(name: str) -> str:
    """The spec a dataset name most likely came from (`scenes[400]` -> `scenes#400`): the best
    guess for a store that records no spec."""
    subset = _SUBSET_NAME.match(name)
    if subset:
        return f"{spec_from_name(subset.group(1))}#{subset.group(2)}"
    return _NAME_SPECS.get(name, name)


def open_dataset(
    store: ActivationStore, spec: str | None = None, progress: bool = True
) -> ImageDataset:
    """The dataset behind `store`: `spec` when given, else the spec the store records, else
    (stores written before specs were recorded) the spec its dataset name suggests.

    The dataset must have the store's fingerprint and as many images as the extraction read
    (the store's images plus the skipped ones); otherwise, or when nothing opens, a one-line
    VisaeError says what differs.
    """
    name = str(store.dataset["name"])
    if spec is None and store.dataset_spec is None:
        guess = spec_from_name(name)
        try:
            dataset = load_dataset(guess, progress=progress)
        except VisaeError as exc:
            raise VisaeError(
                f"store {store.path} records no dataset spec and its dataset name {name!r} does "
                f"not open ({exc}): pass the dataset (--dataset)"
            ) from None
        if dataset.fingerprint != store.dataset["fingerprint"]:
            raise VisaeError(
                f"store {store.path} records no dataset spec and its dataset name {name!r} "
                "opens other images (another fingerprint): pass the dataset (--dataset)"
            )
        _check_count(store, dataset, guess)
        return dataset
    chosen = spec if spec is not None else str(store.dataset_spec)
    try:
        dataset = load_dataset(chosen, progress=progress)
    except VisaeError as exc:
        if spec is not None:
            raise
        raise VisaeError(
            f"store {store.path}: its dataset spec {chosen!r} does not open ({exc}); "
            "pass the dataset (--dataset)"
        ) from None
    want = str(store.dataset["fingerprint"])
    if dataset.fingerprint != want:
        raise VisaeError(
            f"dataset {chosen!r} is not the one store {store.path} was extracted from "
            f"(fingerprint {dataset.fingerprint[:12]}, the store's {want[:12]})"
        )
    _check_count(store, dataset, chosen)
    return dataset


def _check_count(store: ActivationStore, dataset: ImageDataset, spec: str) -> None:
    extracted = store.n_images + len(store.skipped)
    if len(dataset) != extracted:
        raise VisaeError(
            f"dataset {spec!r} has {len(dataset)} images; store {store.path} was extracted "
            f"from {extracted}"
        )
