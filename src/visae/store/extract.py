"""Record a backbone's activations over a dataset into a store, resumably.

Shard `k` always holds dataset images `[k * shard_images, (k + 1) * shard_images)` (less
the unreadable ones), and batches never straddle shards, so an interrupted extraction that
is run again redoes exactly the same forward passes and writes the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from visae.devices import half_precision_is_emulated
from visae.dist import Ranks
from visae.errors import VisaeError
from visae.store.format import n_layout_tokens
from visae.store.reader import ActivationStore
from visae.store.writer import LayerSpec, PartWriter, StoreSpec, StoreWriter

if TYPE_CHECKING:
    from PIL import Image

    from visae.backbones.base import Backbone
    from visae.data.base import ImageDataset

logger = logging.getLogger("visae.store")

ON_UNREADABLE = ("skip", "fail")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "unreadable"
    return f"{type(exc).__name__}: {text}"


def store_spec(
    backbone: Backbone,
    dataset: ImageDataset,
    layers: Sequence[int],
    tokens: str = "all",
    dtype: str = "float16",
    shard_images: int = 256,
    autocast: str | None = None,
) -> StoreSpec:
    """The spec of a store of `backbone`'s activations over `dataset` (with the dataset's
    `spec`, where it has one, so that consumers can reopen the images)."""
    for layer in layers:
        if not isinstance(layer, int | np.integer) or not 0 <= layer < backbone.n_layers:
            raise VisaeError(
                f"layer {layer!r} is out of range for {backbone.name} (0..{backbone.n_layers - 1})"
            )
    return StoreSpec(
        backbone={
            "name": backbone.name,
            "weights_hash": backbone.weights_hash,
            "preprocessing": backbone.preprocessing,
        },
        dataset=_dataset_entry(dataset),
        layers=[LayerSpec(int(L), backbone.d(int(L)), backbone.layout(int(L))) for L in layers],
        dtype=dtype,
        tokens=tokens,
        shard_images=shard_images,
        autocast=autocast,
    )


def _dataset_entry(dataset: ImageDataset) -> dict[str, Any]:
    entry = {"name": dataset.name, "fingerprint": dataset.fingerprint}
    spec = getattr(dataset, "spec", None)
    if spec is not None:
        entry["spec"] = str(spec)
    return entry


def _precision(autocast: str | None, device: str) -> contextlib.AbstractContextManager[Any]:
    """The context the backbone forward runs in: `torch.autocast` for "bf16" / "fp16" (a
    value `StoreSpec` has checked). A device that cannot autocast to that dtype (torch only
    warns and runs in full precision) is an error, so the manifest never claims a precision
    that was not used."""
    if autocast is None:
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if autocast == "bf16" else torch.float16
    device_type = torch.device(device).type
    capability = torch.backends.cpu.get_cpu_capability()
    if half_precision_is_emulated(device):
        logger.warning(
            "autocast %s on this CPU (%s, no AVX-512) emulates %s and usually runs several "
            "times slower than full precision; autocast pays on GPUs and AVX-512/AMX CPUs",
            autocast,
            capability,
            autocast,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return torch.autocast(device_type, dtype=dtype)
    except (RuntimeError, ValueError, UserWarning) as exc:
        reason = " ".join(str(exc).split())
        raise VisaeError(f"autocast {autocast} is not available on {device}: {reason}") from None


def extract(
    backbone: Backbone,
    dataset: ImageDataset,
    out: str | os.PathLike[str],
    layers: Sequence[int],
    tokens: str = "all",
    dtype: str = "float16",
    batch_size: int = 32,
    shard_images: int = 256,
    device: str = "cpu",
    on_unreadable: str = "skip",
    progress: bool = True,
    autocast: str | None = None,
    ranks: Ranks | None = None,
) -> ActivationStore:
    """Run `backbone` over `dataset` and store the stream after each of `layers`.

    Resumes an interrupted store at `out` (same backbone, preprocessing, dataset, layers,
    tokens, dtype, autocast and shard size; anything else is refused). Unreadable images are
    skipped and listed in the manifest (`on_unreadable="skip"`) or stop the run (`"fail"`).
    `autocast` ("bf16", "fp16") runs the forward under `torch.autocast` (faster on GPUs and
    AVX-512 CPUs, slightly different numbers; recorded in the manifest); the store keeps its
    `dtype` either way.

    With `ranks` of a distributed job (`visae.dist.current()`, under torchrun), the ranks
    share the shards still to write and rank 0 lists them in the manifest: the store is the
    one a single process writes, byte for byte, and a killed job resumes with any number of
    ranks.
    """
    if on_unreadable not in ON_UNREADABLE:
        raise VisaeError(f"on_unreadable must be 'skip' or 'fail', not {on_unreadable!r}")
    if batch_size < 1:
        raise VisaeError(f"batch_size must be positive, not {batch_size}")
    if not layers:
        raise VisaeError("extract needs at least one layer")
    spec = store_spec(backbone, dataset, layers, tokens, dtype, shard_images, autocast)
    precision = _precision(autocast, device)
    layer_list = [e["layer"] for e in spec.layer_entries]
    n_total = len(dataset)
    n_shards = math.ceil(n_total / shard_images)
    if ranks is not None and ranks.distributed:
        return _extract_ranks(
            backbone,
            dataset,
            out,
            spec,
            precision,
            batch_size,
            device,
            on_unreadable,
            progress,
            ranks,
        )

    with StoreWriter(out, spec) as writer:
        if writer.complete:
            logger.warning(
                "store %s is already complete with the same backbone, dataset and layers; "
                "nothing to do",
                out,
            )
            return ActivationStore.open(out, verify=False, progress=progress)
        consumed = writer.n_images + writer.n_skipped
        if consumed != min(writer.n_shards * shard_images, n_total):
            raise VisaeError(
                f"cannot resume {out}: its shards do not follow extract's layout "
                f"({consumed} images read in {writer.n_shards} shards of {shard_images})"
            )
        if writer.resumed and writer.n_shards:
            logger.warning("resuming %s after %d of %d shards", out, writer.n_shards, n_shards)
        backbone.to(device)
        with tqdm(
            total=n_total,
            initial=consumed,
            unit="img",
            desc=f"extract {backbone.name}",
            disable=not progress,
        ) as bar:
            for shard in range(writer.n_shards, n_shards):
                lo = shard * shard_images
                hi = min(lo + shard_images, n_total)
                with precision:
                    acts, metadata, skipped = _run_shard(
                        backbone, dataset, spec, layer_list, lo, hi, batch_size, on_unreadable, bar
                    )
                writer.append_shard(acts, metadata, skipped)
        writer.finish()
    return ActivationStore.open(out, verify=False, progress=progress)


def _extract_ranks(
    backbone: Backbone,
    dataset: ImageDataset,
    out: str | os.PathLike[str],
    spec: StoreSpec,
    precision: contextlib.AbstractContextManager[Any],
    batch_size: int,
    device: str,
    on_unreadable: str,
    progress: bool,
    ranks: Ranks,
) -> ActivationStore:
    """`extract` as one rank of a job: rank 0 opens (or resumes) the store and holds it; every
    rank writes every `world`-th shard still missing; rank 0 then lists them all."""
    n_total = len(dataset)
    shard_images = spec.shard_images
    n_shards = math.ceil(n_total / shard_images)
    holder: list[StoreWriter] = []

    def open_store() -> list[int] | None:
        writer = StoreWriter(out, spec)
        holder.append(writer)
        if writer.complete:
            return None
        parts = writer.parts()
        for index, record in parts.items():
            want = min(shard_images, n_total - index * shard_images)
            if index >= n_shards or record["images"] + len(record["skipped"]) != want:
                raise VisaeError(
                    f"cannot resume {out}: its shard {index} does not follow extract's layout"
                )
        return [*range(writer.n_shards), *parts]

    try:
        done = ranks.from_main(open_store)
        if done is None:
            if ranks.main:
                logger.warning("store %s is already complete; nothing to do", out)
            return ActivationStore.open(out, verify=False, progress=False)
        written = set(done)
        todo = [s for s in range(n_shards) if s not in written]
        mine = todo[ranks.rank :: ranks.world]
        if ranks.main and done:
            logger.warning(
                "resuming %s: %d of %d shards are written, %d ranks share the rest",
                out,
                len(done),
                n_shards,
                ranks.world,
            )
        writer = PartWriter(out, spec)
        layer_list = [e["layer"] for e in spec.layer_entries]
        backbone.to(device)
        total = sum(min(shard_images, n_total - s * shard_images) for s in mine)
        with tqdm(
            total=total,
            unit="img",
            desc=f"extract {backbone.name} ({ranks.label()})",
            disable=not (progress and ranks.main),
        ) as bar:
            for shard in mine:
                lo = shard * shard_images
                hi = min(lo + shard_images, n_total)
                with precision:
                    acts, metadata, skipped = _run_shard(
                        backbone, dataset, spec, layer_list, lo, hi, batch_size, on_unreadable, bar
                    )
                writer.write(shard, acts, metadata, skipped)
        ranks.barrier()
        if ranks.main:
            writer = holder[0]
            writer.adopt_parts()
            if writer.n_shards != n_shards:
                raise VisaeError(
                    f"store {out}: {writer.n_shards} of {n_shards} shards are listed after "
                    "every rank finished"
                )
            writer.finish()
        ranks.barrier()
    finally:
        for writer in holder:
            writer.close()
    return ActivationStore.open(out, verify=False, progress=False)


def _run_shard(
    backbone: Backbone,
    dataset: ImageDataset,
    spec: StoreSpec,
    layers: list[int],
    lo: int,
    hi: int,
    batch_size: int,
    on_unreadable: str,
    bar: tqdm,
) -> tuple[dict[int, np.ndarray], list[dict[str, Any]], list[dict[str, Any]]]:
    """Forward passes over dataset images `[lo, hi)` in batches that stay inside the range."""
    entries = {e["layer"]: e for e in spec.layer_entries}
    acts = {
        L: np.empty((hi - lo, entries[L]["n_tokens"], entries[L]["d"]), dtype=np.float32)
        for L in layers
    }
    metadata: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        images: list[Image.Image] = []
        for i in range(start, stop):
            meta = dict(dataset.metadata(i))
            source = str(meta.get("source", f"image {i}"))
            try:
                img = dataset.image(i)
                img.load()
            except Exception as exc:
                reason = _one_line(exc)
                if on_unreadable == "fail":
                    raise VisaeError(f"cannot read image {i} ({source}): {reason}") from exc
                logger.warning(
                    "skipping unreadable image %d (%s), listed in the manifest's skipped: %s",
                    i,
                    source,
                    reason,
                )
                skipped.append({"index": i, "source": source, "reason": reason})
                continue
            images.append(img)
            metadata.append({**meta, "dataset_index": i})
        if images:
            recorded = backbone.record(backbone.preprocess(images), layers)
            row = len(metadata) - len(images)
            for L in layers:
                e = entries[L]
                t = recorded[L]
                want = (len(images), n_layout_tokens(e["model_layout"]), e["d"])
                if tuple(t.shape) != want:
                    raise VisaeError(
                        f"{backbone.name} layer {L} produced {list(t.shape)}, its layout "
                        f"and width say {list(want)}"
                    )
                start_tok, stop_tok = e["model_tokens"]
                acts[L][row : row + len(images)] = t[:, start_tok:stop_tok].float().cpu().numpy()
        bar.update(stop - start)
    n = len(metadata)
    return {L: a[:n] for L, a in acts.items()}, metadata, skipped
