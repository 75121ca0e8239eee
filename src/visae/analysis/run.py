"""The analysis pass: one ordered streaming pass over a store through an SAE, then the
artifact (tables, compact arrays, thumbnails, plots) written atomically."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import visae.analysis.artifact as fmt
from visae import __version__
from visae.analysis.accumulate import HistogramSpec, LatentStats, PatchCodes, TopN, top_rows
from visae.analysis.artifact import Analysis
from visae.analysis.thumbs import image_loader, make_thumbnail
from visae.atomic import atomic_directory
from visae.devices import resolve_device
from visae.errors import VisaeError
from visae.pairing import resolve_pair

if TYPE_CHECKING:
    from visae.data.base import ImageDataset
    from visae.sae import SAE
    from visae.store import ActivationStore


logger = logging.getLogger("visae.analysis")

# one image's per-patch (latents [P, K], values [P, K]) and CLS (latents [K], values [K]) codes
ImageCodes = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass(frozen=True)
class AnalysisConfig:
    """Knobs of the pass; every one is recorded in the artifact.

    `top_n` images per latent and ranking; `tokens` the kinds whose firing defines the
    statistics ("patch", "cls" or "all"; None: those the SAE was trained on; patch tokens are
    always encoded for the maps); `sample_images` images picked (seeded) for browsing
    beside the top images; `patch_codes_k` strongest latents kept per patch of every stored
    image; `batch_images` images per bookkeeping step (larger steps merge the top lists less
    often, and most early entrants never get written); `encode_tokens` tokens per SAE call
    (bounds the SAE's `[tokens, n_latents]` pre-activations in memory).
    """

    top_n: int = 16
    tokens: str | None = None
    sample_images: int = 200
    patch_codes_k: int = 16
    thumb_size: int = 160
    batch_images: int = 128
    encode_tokens: int = 8192
    seed: int = 0
    histogram: HistogramSpec = field(default_factory=HistogramSpec)

    def __post_init__(self) -> None:
        for name in ("top_n", "patch_codes_k", "thumb_size", "batch_images", "encode_tokens"):
            if getattr(self, name) < 1:
                raise VisaeError(f"analysis {name} must be at least 1, got {getattr(self, name)}")
        if self.sample_images < 0:
            raise VisaeError(f"analysis sample_images must be >= 0, got {self.sample_images}")
        if self.tokens not in (None, "patch", "cls", "all"):
            raise VisaeError(f"analysis tokens must be patch, cls or all, not {self.tokens!r}")


@dataclass
class PassResult:
    """What the streaming pass holds at its end (all bounded by the latent count)."""

    stats: LatentStats
    tops: dict[str, TopN]
    codes: dict[int, ImageCodes]
    sample: np.ndarray
    seconds: float
    tokens: str


def stream_pass(
    sae: SAE,
    store: ActivationStore,
    layer: int,
    config: AnalysisConfig,
    *,
    tokens: str = "patch",
    device: str = "cpu",
    progress: bool = True,
) -> PassResult:
    """Encode every image's patch tokens (and its CLS token when `tokens` is "cls" or "all")
    once, in image order, and accumulate statistics, top-N lists with maps, and the sparse
    per-patch codes of the images that end up in some top list or in the sample."""
    layout = store.layout(layer)
    n_patches = layout.n_patches
    if n_patches == 0:
        raise VisaeError(f"store {store.path} layer {layer} has no patch tokens to analyse")
    if tokens in ("cls", "all") and layout.n_cls == 0:
        raise VisaeError(f"store {store.path} layer {layer} holds no CLS token to analyse")
    d = store.d(layer)
    n_latents = int(sae.cfg.n_latents)
    patch_pos = store.token_positions(layer, "patch")
    patch_sl = slice(int(patch_pos[0]), int(patch_pos[-1]) + 1)
    with_cls = tokens in ("cls", "all")
    cls_pos = int(store.token_positions(layer, "cls")[0]) if with_cls else 0
    k = min(config.patch_codes_k, n_latents)
    n_images = store.n_images
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(n_images, min(config.sample_images, n_images), replace=False))
    sample_set = {int(i) for i in sample}

    stats = LatentStats(n_latents, config.histogram, with_cls, device=device)
    tops = {
        r: TopN(n_latents, config.top_n, n_patches, device=device)
        for r in fmt.RANKINGS
        if r != "cls" or with_cls
    }
    codes: dict[int, ImageCodes] = {}
    batch_images = config.batch_images
    # evicting the codes of images that left every list costs a pass over the lists, so it runs
    # whenever the held codes have doubled: memory stays within twice the live set
    evict_at = 2 * batch_images
    start = time.perf_counter()
    bar = tqdm(total=n_images, unit="img", desc=f"analysis layer {layer}", disable=not progress)
    with torch.inference_mode():
        for ids_np, acts in store.ordered(layer, tokens="all", batch_images=batch_images):
            b = len(ids_np)
            ids = torch.from_numpy(np.ascontiguousarray(ids_np, dtype=np.int64)).to(device)
            x = torch.from_numpy(np.ascontiguousarray(acts[:, patch_sl])).to(device)
            x = x.reshape(b * n_patches, d)
            if with_cls:
                x = torch.cat([x, torch.from_numpy(acts[:, cls_pos]).to(device)])
            vals, lats = _encode(sae, x, config.encode_tokens)
            with _bookkeeping_threads(device):
                n_tok = b * n_patches
                sparse = PatchCodes(vals[:n_tok], lats[:n_tok], b, n_latents)
                cls_rows = cls_BL = None
                if with_cls:
                    cls_rows = (vals[n_tok:].float(), lats[n_tok:].long())
                    # padding entries add 0 at latent 0, so a scatter-add is exact
                    cls_BL = torch.zeros((b, n_latents), device=vals.device).scatter_add_(
                        1, cls_rows[1], cls_rows[0]
                    )
                img_max = sparse.per_image("amax")
                stats.update(sparse, img_max, cls_BL)
                img_mean = sparse.per_image("sum") / n_patches
                entered = [
                    tops["max"].update(ids, img_max, sparse),
                    tops["mean"].update(ids, img_mean, sparse),
                ]
                if cls_BL is not None:
                    entered.append(tops["cls"].update(ids, cls_BL, sparse))
                keep = set(torch.cat(entered).tolist()) | sample_set.intersection(ids_np.tolist())
                _retain(codes, keep, ids_np, sparse, cls_rows, k)
                if len(codes) > evict_at:
                    _evict(codes, tops, sample_set)
                    evict_at = 2 * len(codes) + batch_images
            bar.update(b)
    bar.close()
    _evict(codes, tops, sample_set)
    if stats.n_images != n_images:
        raise VisaeError(
            f"store {store.path} layer {layer} yielded {stats.n_images} images, "
            f"its manifest says {n_images}"
        )
    return PassResult(stats, tops, codes, sample, time.perf_counter() - start, tokens)


@contextlib.contextmanager
def _bookkeeping_threads(device: str) -> Iterator[None]:
    """One CPU thread for the bookkeeping: its operations are small and memory-bound, and on
    a busy machine the per-operation synchronisation of a thread pool costs more than the
    work (measured: ~3x). The SAE's matmul keeps every thread."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode(sae: SAE, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sae.encode_sparse` over `x` in chunks of `chunk` tokens, rows padded to one width."""
    parts = [sae.encode_sparse(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    if len(parts) == 1:
        return parts[0]
    width = max(v.shape[1] for v, _ in parts)
    vals = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v, _ in parts])
    lats = torch.cat([torch.nn.functional.pad(li, (0, width - li.shape[1])) for _, li in parts])
    return vals, lats


def _retain(
    codes: dict[int, ImageCodes],
    keep: set[int],
    ids_np: np.ndarray,
    sparse: PatchCodes,
    cls_rows: tuple[torch.Tensor, torch.Tensor] | None,
    k: int,
) -> None:
    """Keep each listed image's strongest `k` latents per patch (and of its CLS token)."""
    if not keep:
        return
    local = np.searchsorted(ids_np, sorted(keep))
    rows = torch.from_numpy(local).to(sparse.value.device)
    lats_t, vals_t = sparse.strongest(rows, k)
    lats = lats_t.to(torch.int32).cpu().numpy()
    vals = vals_t.to(torch.float16).cpu().numpy()
    cls_vals = cls_lats = None
    if cls_rows is not None:
        cl, cv = top_rows(cls_rows[0][rows], cls_rows[1][rows], k)
        cls_lats = cl.to(torch.int32).cpu().numpy()
        cls_vals = cv.to(torch.float16).cpu().numpy()
    for j, li in enumerate(local):
        codes[int(ids_np[li])] = (
            lats[j],
            vals[j],
            None if cls_lats is None else cls_lats[j],
            None if cls_vals is None else cls_vals[j],
        )


def _evict(codes: dict[int, Any], tops: dict[str, TopN], sample_set: set[int]) -> None:
    """Drop the codes of images that have left every top list (memory stays bounded)."""
    live = torch.unique(torch.cat([t.images.flatten() for t in tops.values()])).cpu().numpy()
    held = np.fromiter(codes.keys(), dtype=np.int64, count=len(codes))
    for i in np.setdiff1d(held, live, assume_unique=True).tolist():
        if i not in sample_set:
            del codes[i]


def run_analysis(
    sae: SAE | str | os.PathLike[str],
    store: ActivationStore | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layer: int | None = None,
    dataset: ImageDataset | str | None = None,
    config: AnalysisConfig | None = None,
    name: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Analysis:
    """Analyse `sae` over `store` and write the artifact directory `out`.

    `layer` defaults to the layer recorded in the SAE's metadata (or the store's only layer).
    Thumbnails are rendered from `dataset` (a dataset or a spec) when given, else from the
    dataset spec the store records (see `visae.store.open_dataset`). The directory appears
    only when complete.
    """
    from visae.sae import SAE
    from visae.store import ActivationStore

    config = config or AnalysisConfig()
    sae_path = None
    if not isinstance(sae, SAE):
        sae_path = str(Path(sae).resolve())
        sae = SAE.load(sae)
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    out = Path(out)
    if out.exists() and not overwrite:
        raise VisaeError(f"analysis output {out} exists (pass overwrite=True / --overwrite)")
    layer, trained = resolve_pair(sae, store, layer)
    tokens = config.tokens or trained
    identity = store.identity()
    dataset = _images_of(store, dataset, progress)
    metadata = store.metadata()
    load_image = image_loader(metadata, dataset)
    if metadata:
        load_image(0)  # fail before the pass, not after it, when images cannot be found
    device = str(resolve_device(device))
    sae = sae.to(device).eval()
    if tokens == "cls":
        logger.warning(
            "this SAE was trained on CLS tokens: its statistics count CLS firing only; the "
            "patch maps come from encoding patch tokens, which it never saw in training"
        )
    elif tokens != trained:
        logger.warning(
            "analysing %s tokens of an SAE trained on %s tokens (as asked)", tokens, trained
        )
    result = stream_pass(sae, store, layer, config, tokens=tokens, device=device, progress=progress)

    with atomic_directory(out) as tmp:
        _write(
            tmp,
            sae,
            sae_path,
            store,
            identity,
            layer,
            config,
            result,
            metadata,
            load_image,
            name,
            progress,
        )
    return Analysis.load(out)


def _images_of(
    store: ActivationStore, dataset: ImageDataset | str | None, progress: bool
) -> ImageDataset | None:
    """The images behind the store, checked to be the ones it was extracted from: `dataset`
    (an object or a spec), else the spec the store records. None only for an old store that
    records no spec and whose name opens nothing: thumbnails then come from the file paths
    in its per-image metadata."""
    from visae.store import open_dataset

    if dataset is None or isinstance(dataset, str):
        try:
            return open_dataset(store, dataset, progress=progress)
        except VisaeError:
            if dataset or store.dataset_spec:
                raise
            return None
    fp = store.dataset["fingerprint"]
    if fp and fp != dataset.fingerprint:
        raise VisaeError(
            f"dataset {dataset.name} (fingerprint {dataset.fingerprint[:12]}) is not the one "
            f"store {store.path} was extracted from ({str(fp)[:12]})"
        )
    extracted = store.n_images + len(store.skipped)
    if len(dataset) != extracted:
        raise VisaeError(
            f"dataset {dataset.name} has {len(dataset)} images; store {store.path} was "
            f"extracted from {extracted}"
        )
    return dataset


def _write(
    root: Path,
    sae: SAE,
    sae_path: str | None,
    store: ActivationStore,
    identity: dict[str, Any],
    layer: int,
    config: AnalysisConfig,
    result: PassResult,
    metadata: list[dict[str, Any]],
    load_image: Callable[[int], Image.Image],
    name: str | None,
    progress: bool,
) -> None:
    stats, tops = result.stats, result.tops
    layout = store.layout(layer)
    h, w = layout.grid

    (root / fmt.TOP_DIR).mkdir()
    top_images: set[int] = set()
    for ranking, top in tops.items():
        images = top.images.cpu().numpy()
        np.save(
            root / fmt.top_file(ranking, "values"),
            np.where(images >= 0, top.values.cpu().numpy(), 0.0).astype(np.float32),
        )
        np.save(root / fmt.top_file(ranking, "images"), images)
        maps = top.maps.cpu().numpy().reshape(-1, h * w)
        slot, patch = np.nonzero(maps)
        counts = np.bincount(slot, minlength=maps.shape[0])
        np.save(
            root / fmt.top_file(ranking, "map_ptr"),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )
        np.save(root / fmt.top_file(ranking, "map_patch"), patch.astype(np.int32))
        np.save(root / fmt.top_file(ranking, "map_value"), maps[slot, patch])
        top_images.update(int(i) for i in np.unique(images[images >= 0]))
    np.save(root / fmt.HIST_FILE, stats.hist.cpu().numpy())

    stored = np.array(sorted(result.codes), dtype=np.int64)
    wanted = top_images | {int(i) for i in result.sample}
    if set(stored.tolist()) != wanted:
        raise RuntimeError("analysis pass lost the codes of some listed images")
    (root / fmt.CODES_DIR).mkdir()
    np.save(root / fmt.CODES_DIR / "images.npy", stored)
    entries = [result.codes[int(i)] for i in stored]
    k = min(config.patch_codes_k, int(sae.cfg.n_latents))
    # latent ids fit int16 for dictionaries below 32768 latents: a third less on disk
    id_dtype = np.int16 if int(sae.cfg.n_latents) < 2**15 else np.int32
    np.save(
        root / fmt.CODES_DIR / "latents.npy",
        np.stack([e[0] for e in entries]).astype(id_dtype)
        if entries
        else np.zeros((0, h * w, k), id_dtype),
    )
    np.save(
        root / fmt.CODES_DIR / "values.npy",
        np.stack([e[1] for e in entries]) if entries else np.zeros((0, h * w, k), np.float16),
    )
    if "cls" in tops:
        np.save(
            root / fmt.CODES_DIR / "cls_latents.npy",
            np.stack([e[2] for e in entries]).astype(id_dtype)
            if entries
            else np.zeros((0, k), id_dtype),
        )
        np.save(
            root / fmt.CODES_DIR / "cls_values.npy",
            np.stack([e[3] for e in entries]) if entries else np.zeros((0, k), np.float16),
        )

    labels = {int(i): list(metadata[int(i)].get("labels") or []) for i in stored}
    base_counts = Counter(lab for m in metadata for lab in set(m.get("labels") or []))
    base_rate = {lab: c / max(len(metadata), 1) for lab, c in base_counts.items()}
    table = _latent_table(stats, tops, labels, base_rate, result.tokens)
    fmt.write_table(root / fmt.LATENTS_FILE, table)

    preprocessing = dict(store.backbone.get("preprocessing") or {})
    (root / fmt.THUMBS_DIR).mkdir()
    sample_set = {int(i) for i in result.sample}
    rows = []
    for i in tqdm(stored.tolist(), desc="thumbnails", unit="img", disable=not progress):
        thumb = make_thumbnail(load_image(i), preprocessing, config.thumb_size)
        thumb.save(root / fmt.thumb_file(i), quality=88)
        rows.append(
            {
                "image": i,
                "source": str(metadata[i].get("source", "")),
                "labels": labels[i],
                "thumb": fmt.thumb_file(i),
                "sample": i in sample_set,
            }
        )
    (root / fmt.IMAGES_FILE).write_text(json.dumps(rows), encoding="utf-8")

    meta = {
        "format": fmt.FORMAT_NAME,
        "schema_version": fmt.SCHEMA_VERSION,
        "visae_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "name": name or _default_name(sae, sae_path, store, layer),
        "sae": {
            "path": sae_path or sae.checkpoint_info.get("path"),
            "config": sae.cfg.to_dict(),
            "n_latents": int(sae.cfg.n_latents),
            "d": int(sae.cfg.d),
            "trained_layer": sae.checkpoint_info.get("layer"),
            "metadata": _jsonable(sae.checkpoint_info.get("metadata") or {}),
        },
        "store": {"path": str(store.path), **_jsonable(identity)},
        "backbone": store.backbone.get("name"),
        "layer": layer,
        "layout": layout.to_dict(),
        "grid": [h, w],
        "n_images": stats.n_images,
        "n_patch_tokens": stats.n_patch_tokens,
        "tokens": result.tokens,
        "rankings": list(tops),
        "top_n": config.top_n,
        "histogram": config.histogram.to_dict(),
        "patch_codes_k": k,
        "n_code_images": len(stored),
        "sample_images": len(result.sample),
        "seed": config.seed,
        "thumb_size": config.thumb_size,
        "has_labels": any(labels.values()),
        "n_dead": int(table["dead"].sum()),
        "pass_seconds": round(result.seconds, 3),
    }
    (root / fmt.META_FILE).write_text(
        json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    from visae.analysis.plots import plot_frequency_histogram

    (root / fmt.PLOTS_DIR).mkdir()
    plot_frequency_histogram(Analysis(root, meta), root / fmt.PLOTS_DIR / "frequency.png")


def _latent_table(
    stats: LatentStats,
    tops: dict[str, TopN],
    labels: dict[int, list[str]],
    base_rate: dict[str, float],
    tokens: str,
) -> dict[str, np.ndarray | list[Any]]:
    n_lat = stats.n_latents
    fire_patch = stats.fire_patch.cpu().numpy()
    fire_image = stats.fire_image.cpu().numpy()
    fire_cls = stats.fire_cls.cpu().numpy()
    sum_patch = stats.sum_patch.cpu().numpy()
    nan = np.full(n_lat, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_active = np.where(fire_patch > 0, sum_patch / np.maximum(fire_patch, 1), np.nan)
    if stats.with_cls:
        freq_cls = fire_cls / max(stats.n_images, 1)
        mean_cls = stats.sum_cls.cpu().numpy() / max(stats.n_images, 1)
        max_cls = stats.max_cls.cpu().numpy().astype(np.float64)
    else:
        freq_cls = mean_cls = max_cls = nan
    # dead: never fired on the token kinds the statistics count
    dead = {"patch": fire_patch == 0, "cls": fire_cls == 0}.get(
        tokens, (fire_patch == 0) & (fire_cls == 0)
    )
    top_label, top_frac, top_base = [], np.full(n_lat, np.nan), np.full(n_lat, np.nan)
    max_images = tops["max"].images.cpu().numpy()
    for j in range(n_lat):
        imgs = [int(i) for i in max_images[j] if i >= 0]
        counts = Counter(lab for i in imgs for lab in set(labels.get(i, [])))
        # the label most over-represented among the top images relative to the whole store
        # (a label every image carries says nothing about the latent)
        best = min(
            counts.items(),
            key=lambda kv: (base_rate[kv[0]] - kv[1] / len(imgs), -kv[1], kv[0]),
            default=None,
        )
        if best is not None and best[1] / len(imgs) > base_rate[best[0]]:
            top_label.append(best[0])
            top_frac[j] = best[1] / len(imgs)
            top_base[j] = base_rate[best[0]]
        else:
            top_label.append("")
    return {
        "latent": np.arange(n_lat),
        "dead": dead.astype(np.int64),
        "freq_patch": fire_patch / max(stats.n_patch_tokens, 1),
        "freq_image": fire_image / max(stats.n_images, 1),
        "freq_cls": freq_cls,
        "mean_patch": sum_patch / max(stats.n_patch_tokens, 1),
        "mean_active": mean_active,
        "max_patch": stats.max_patch.cpu().numpy().astype(np.float64),
        "mean_cls": mean_cls,
        "max_cls": max_cls,
        "fire_patch": fire_patch,
        "fire_image": fire_image,
        "fire_cls": fire_cls,
        "top_label": top_label,
        "top_label_frac": top_frac,
        "top_label_base": top_base,
    }


def _default_name(sae: SAE, sae_path: str | None, store: ActivationStore, layer: int) -> str:
    backbone = store.backbone.get("name", "model")
    path = sae_path or sae.checkpoint_info.get("path")
    run = (sae.checkpoint_info.get("metadata") or {}).get("run")  # the trainer's run name
    sae_name = str(run or (Path(path).name if path else f"{sae.cfg.arch}-{sae.cfg.n_latents}"))
    return f"{sae_name} · {backbone} · layer {layer}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
