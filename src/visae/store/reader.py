"""Reading an activation store: verified opening, ordered reads for analysis, seeded
shuffled reads and uniform token samples for training, and random access. Shards are
memory-mapped; every read returns float32."""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from visae.errors import VisaeError
from visae.store.checks import VerifiedFiles
from visae.store.format import (
    FORMAT_NAME,
    MANIFEST,
    SCHEMA_VERSION,
    TOKEN_CHOICES,
    metadata_file,
    sha256_file,
    shard_file,
)

if TYPE_CHECKING:
    from visae.backbones.base import TokenLayout

_REQUIRED = (
    "schema_version",
    "format",
    "backbone",
    "dataset",
    "dtype",
    "tokens",
    "shard_images",
    "layers",
    "shards",
    "n_images",
    "skipped",
    "complete",
)
_VERIFY_PROGRESS_BYTES = 1 << 30
_OPEN_MAPS = 32
# a shard's rows are copied run by run (no temporary) when the runs are few, else gathered
_MAX_RUN_COPIES = 16


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{size:.1f} TiB"


def _non_negative(name: str, value: int) -> int:
    if not isinstance(value, int | np.integer) or value < 0:
        raise VisaeError(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _distinct(rng: np.random.Generator, total: int, m: int) -> np.ndarray:
    """`m` distinct integers of `[0, total)`, every m-subset equally likely, sorted; memory
    O(m), whatever `total`.

    Draws with replacement until `m` distinct values are in hand, then keeps a random m of
    them: the set drawn is exchangeable, so given its size it is a uniform subset, and so is a
    uniform subset of it. When `m` is more than half of `total`, a permutation is as cheap.
    """
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    if 2 * m >= total:
        return np.sort(rng.permutation(total)[:m]).astype(np.int64)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < m:
        need = m - len(chosen)
        chosen = np.union1d(chosen, rng.integers(0, total, size=need + need // 4 + 8))
    if len(chosen) > m:
        chosen = np.sort(rng.choice(chosen, m, replace=False))
    return chosen


def _rows_float32(buf: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`buf[rows]` as float32. torch gathers and converts float16 about 10x faster than numpy
    (whose half-to-float conversion is not vectorised), which was most of the reader's time."""
    import torch

    out = torch.from_numpy(buf).index_select(0, torch.from_numpy(rows)).float()
    return out.numpy()


@dataclass(frozen=True)
class _EpochPlan:
    """One epoch of `shuffled`, decided before any data is read.

    `order` is the visiting order of the selected images (blocks of consecutive images in a
    random order); window `w` reads `order[bounds[w]:bounds[w + 1]]` and, with the tokens
    carried over from window `w - 1` (`carry_in[w]` of them), yields batches
    `first_batch[w]` to `first_batch[w + 1] - 1`.
    """

    order: np.ndarray
    bounds: np.ndarray
    carry_in: np.ndarray
    first_batch: np.ndarray

    @property
    def n_windows(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_batches(self) -> int:
        return int(self.first_batch[-1])


class _Done:
    """End-of-stream marker of the prefetch queue."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _prefetched(items: Iterator[np.ndarray], depth: int) -> Iterator[np.ndarray]:
    """Run `items` in a background thread, `depth` results ahead of the consumer.

    The work is numpy copies that release the GIL, so it overlaps the consumer's compute.
    Abandoning the iterator stops the thread.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_Done())
        except BaseException as e:
            put(_Failed(e))

    thread = threading.Thread(target=work, name="visae-store-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class ActivationStore:
    """A store opened for reading. Use `ActivationStore.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._layers = {int(e["layer"]): e for e in manifest["layers"]}
        self._images = np.array([s["images"] for s in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._images)]).astype(np.int64)
        self._maps: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._maps_lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        verify: bool | str = "cached",
        allow_incomplete: bool = False,
        progress: bool = True,
    ) -> ActivationStore:
        """Open a store, checking every listed file's size and, by `verify`, its sha256:

        - `"cached"` (default): only files not verified before with their current size,
          mtime and inode (the writer records the files it writes; see `visae.store.checks`);
        - `True`: every file (catches damage that kept a file's size and mtime);
        - `False`: sizes only.

        An incomplete store needs `allow_incomplete=True`.
        """
        if not (isinstance(verify, bool) or verify == "cached"):
            raise VisaeError(f"verify must be True, False or 'cached', not {verify!r}")
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise VisaeError(f"no {MANIFEST} in {root}: not a visae activation store")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VisaeError(f"cannot read {mpath}: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise VisaeError(f"{mpath} is not a visae activation-store manifest")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise VisaeError(
                f"{mpath} has schema version {manifest.get('schema_version')}; "
                f"this visae reads version {SCHEMA_VERSION}"
            )
        for key in _REQUIRED:
            if key not in manifest:
                raise VisaeError(f"{mpath} lacks the field {key!r}")
        if not manifest["complete"] and not allow_incomplete:
            raise VisaeError(
                f"store {root} is incomplete ({manifest['n_images']} images in "
                f"{len(manifest['shards'])} shards; its writer was interrupted): resume it by "
                "running the same extraction again with the same arguments, or open it with "
                "allow_incomplete=True"
            )
        store = cls(root, manifest)
        store._check_files(verify=verify, progress=progress)
        return store

    def _check_files(self, *, verify: bool | str, progress: bool) -> None:
        files = [
            (rel, info) for shard in self.manifest["shards"] for rel, info in shard["files"].items()
        ]
        stats: dict[str, os.stat_result] = {}
        for rel, info in files:
            try:
                st = (self.path / rel).stat()
            except FileNotFoundError:
                raise VisaeError(f"store {self.path}: file {rel} is missing") from None
            if st.st_size != info["bytes"]:
                raise VisaeError(
                    f"store {self.path}: {rel} is truncated or damaged "
                    f"({st.st_size} bytes, the manifest says {info['bytes']})"
                )
            stats[rel] = st
        if verify is False:
            return
        checked = VerifiedFiles(self.path)
        expected = {rel: info["sha256"] for rel, info in files}
        if verify == "cached":
            files = [(r, i) for r, i in files if not checked.holds(r, stats[r], i["sha256"])]
        total = sum(info["bytes"] for _, info in files)
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="verify store",
            disable=not progress or total < _VERIFY_PROGRESS_BYTES,
        )

        def digest(item: tuple[str, dict[str, Any]]) -> tuple[str, bool]:
            rel, info = item
            ok = sha256_file(self.path / rel) == info["sha256"]
            bar.update(info["bytes"])
            return rel, ok

        # hashlib releases the GIL on large buffers: a few threads hash shards in parallel
        try:
            with bar, ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                for rel, ok in pool.map(digest, files):
                    if not ok:
                        raise VisaeError(
                            f"store {self.path}: checksum mismatch in {rel} (the file is corrupted)"
                        )
                    checked.record(rel, stats[rel], expected[rel])
        finally:
            checked.save(keep=stats)

    # -- description ---------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def tokens(self) -> str:
        """Which tokens the store kept when it was written ("all", "patch" or "cls")."""
        return str(self.manifest["tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def backbone(self) -> dict[str, Any]:
        b = self.manifest["backbone"]
        return {
            "name": b["name"],
            "weights_hash": b["weights_hash"],
            "preprocessing": b["preprocessing"],
        }

    @property
    def dataset(self) -> dict[str, Any]:
        return dict(self.manifest["dataset"])

    @property
    def dataset_spec(self) -> str | None:
        """The `visae.data.load_dataset` spec that reopens the store's images (None for stores
        written before specs were recorded, or from a dataset without one); reopen them with
        `visae.store.open_dataset`, which checks they are the same images."""
        spec = self.manifest["dataset"].get("spec")
        return None if spec is None else str(spec)

    @property
    def autocast(self) -> str | None:
        """The reduced precision the backbone ran under at extraction ("bf16", "fp16"), or
        None for full precision."""
        value = self.manifest.get("autocast")
        return None if value is None else str(value)

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Input images that could not be read and are not in the store."""
        return list(self.manifest["skipped"])

    def _entry(self, layer: int) -> dict[str, Any]:
        try:
            return self._layers[int(layer)]
        except KeyError:
            raise VisaeError(
                f"layer {layer} is not in the store {self.path} (layers: "
                f"{', '.join(map(str, self.layers))})"
            ) from None

    def d(self, layer: int) -> int:
        return int(self._entry(layer)["d"])

    def layout(self, layer: int) -> TokenLayout:
        """Layout of the *stored* tokens at `layer` (the model's is in the manifest)."""
        from visae.backbones.base import TokenLayout

        return TokenLayout.from_dict(self._entry(layer)["layout"])

    def kinds(self, layer: int) -> list[str]:
        """Kind of each stored token ("cls", "register", "patch") at `layer`."""
        return [k for k, n in self._entry(layer)["kinds"] for _ in range(n)]

    def _token_slice(self, layer: int, tokens: str) -> slice:
        e = self._entry(layer)
        lay = e["layout"]
        n_special = lay["n_cls"] + lay["n_registers"]
        total = e["n_tokens"]
        if tokens == "all":
            return slice(0, total)
        if tokens == "patch":
            if total == n_special:
                raise VisaeError(
                    f"store {self.path} holds no patch tokens at layer {layer} "
                    f"(stored tokens: {self.tokens})"
                )
            return slice(n_special, total)
        if tokens == "cls":
            if lay["n_cls"] == 0:
                raise VisaeError(
                    f"store {self.path} holds no CLS token at layer {layer} "
                    f"(stored tokens: {self.tokens})"
                )
            return slice(0, lay["n_cls"])
        raise VisaeError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, not {tokens!r}")

    def token_positions(self, layer: int, tokens: str) -> np.ndarray:
        """Indices into the stored token axis of the chosen tokens."""
        s = self._token_slice(layer, tokens)
        return np.arange(s.start, s.stop, dtype=np.int64)

    def n_tokens(self, layer: int, tokens: str) -> int:
        s = self._token_slice(layer, tokens)
        return self.n_images * (s.stop - s.start)

    def size_bytes(self) -> int:
        """Bytes on disk of the shards and metadata listed in the manifest."""
        return sum(
            info["bytes"] for shard in self.manifest["shards"] for info in shard["files"].values()
        )

    def metadata(self) -> list[dict[str, Any]]:
        """Per-image metadata (source, labels, ...), aligned with image indices."""
        out: list[dict[str, Any]] = []
        for shard in self.manifest["shards"]:
            rel = metadata_file(shard["index"])
            lines = (self.path / rel).read_text(encoding="utf-8").splitlines()
            if len(lines) != shard["images"]:
                raise VisaeError(
                    f"store {self.path}: {rel} has {len(lines)} lines for {shard['images']} images"
                )
            out.extend(json.loads(line) for line in lines)
        return out

    def identity(self) -> dict[str, Any]:
        """What a downstream artifact records about the data it came from (`autocast` only
        when the backbone ran in reduced precision, so full-precision identities are those
        recorded before the field existed)."""
        ident = {
            "path": str(self.path.resolve()),
            "schema_version": self.manifest["schema_version"],
            "backbone": self.manifest["backbone"]["name"],
            "weights_hash": self.manifest["backbone"]["weights_hash"],
            "dataset": self.manifest["dataset"]["name"],
            "dataset_fingerprint": self.manifest["dataset"]["fingerprint"],
            "n_images": self.n_images,
            "dtype": self.dtype,
            "tokens": self.tokens,
            "layers": {
                str(e["layer"]): {"d": e["d"], "layout": e["layout"]}
                for e in self.manifest["layers"]
            },
        }
        if self.autocast is not None:
            ident["autocast"] = self.autocast
        return ident

    def summary(self) -> str:
        """Human-readable description (what `visae info` prints)."""
        m = self.manifest
        b, ds = m["backbone"], m["dataset"]
        lines = [
            f"store        {self.path}",
            f"format       {m['format']} v{m['schema_version']}",
            f"backbone     {b['name']}  (weights {str(b['weights_hash'])[:16]})",
            f"preprocess   {json.dumps(b['preprocessing'], sort_keys=True)}",
            f"dataset      {ds['name']}  (fingerprint {str(ds['fingerprint'])[:16]})",
            f"dataset spec {self.dataset_spec or '(none recorded)'}",
            f"images       {self.n_images} in {self.n_shards} shards of up to {m['shard_images']}",
            f"skipped      {len(m['skipped'])} unreadable images",
            f"tokens       {m['tokens']}",
            f"dtype        {m['dtype']}",
            f"autocast     {self.autocast or 'none (full precision)'}",
        ]
        for e in m["layers"]:
            lay = e["layout"]
            parts = []
            if lay["n_cls"]:
                parts.append(f"{lay['n_cls']} cls")
            if lay["n_registers"]:
                parts.append(f"{lay['n_registers']} registers")
            if lay["grid"][0] * lay["grid"][1]:
                parts.append(f"{lay['grid'][0]}x{lay['grid'][1]} patches")
            lines.append(
                f"layer {e['layer']:<6} d={e['d']}  {e['n_tokens']} tokens ({' + '.join(parts)})"
            )
        nonfinite = sum(len(s.get("nonfinite", [])) for s in m["shards"])
        if nonfinite:
            lines.append(f"non-finite   {nonfinite} (image, layer) pairs hold NaN/inf")
        lines.append(f"size         {_human_bytes(self.size_bytes())}")
        lines.append(f"complete     {'yes' if m['complete'] else 'no (resumable)'}")
        return "\n".join(lines)

    # -- reading -------------------------------------------------------------------------

    def _shard(self, layer: int, shard: int) -> np.ndarray:
        """Memory map of one shard, checked against the manifest. The most recent maps are
        kept open; each holds a file descriptor, so a store of thousands of shards cannot
        keep them all."""
        key = (layer, shard)
        with self._maps_lock:
            arr = self._maps.get(key)
            if arr is not None:
                self._maps.move_to_end(key)
                return arr
        e = self._entry(layer)
        rel = shard_file(layer, shard)
        try:
            arr = np.load(self.path / rel, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise VisaeError(f"store {self.path}: cannot read {rel}: {exc}") from None
        want = (int(self._images[shard]), e["n_tokens"], e["d"])
        if arr.shape != want or arr.dtype != np.dtype(self.dtype):
            raise VisaeError(
                f"store {self.path}: {rel} holds {arr.dtype} {list(arr.shape)}, "
                f"the manifest says {self.dtype} {list(want)}"
            )
        with self._maps_lock:
            self._maps[key] = arr
            while len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        return arr

    def _locate(self, image: int) -> tuple[int, int]:
        if not 0 <= image < self.n_images:
            raise VisaeError(f"image {image} is out of range (store has {self.n_images} images)")
        shard = int(np.searchsorted(self._starts, image, side="right")) - 1
        return shard, image - int(self._starts[shard])

    def _image_mask(self, images: np.ndarray | None) -> np.ndarray | None:
        """Boolean mask over store images from an index array (None: all images)."""
        if images is None:
            return None
        idx = np.asarray(images, dtype=np.int64).ravel()
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_images):
            raise VisaeError(f"image indices must be in 0..{self.n_images - 1}")
        mask = np.zeros(self.n_images, dtype=bool)
        mask[idx] = True
        return mask

    def get(self, layer: int, image: int, token: int) -> np.ndarray:
        """One token's activation `[d]` (token indexes the stored token axis)."""
        e = self._entry(layer)
        if not 0 <= token < e["n_tokens"]:
            raise VisaeError(
                f"token {token} is out of range at layer {layer} ({e['n_tokens']} stored tokens)"
            )
        shard, local = self._locate(image)
        return np.array(self._shard(layer, shard)[local, token], dtype=np.float32)

    def ordered(
        self,
        layer: int,
        tokens: str = "all",
        batch_images: int = 64,
        images: np.ndarray | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(image_ids [B] int64, acts [B, T_sel, d] float32)` in image order, `B <=
        batch_images` (only the last batch is short). `images` (store image indices) reads
        only those, in increasing order."""
        if batch_images < 1:
            raise VisaeError(f"batch_images must be positive, not {batch_images}")
        sl = self._token_slice(layer, tokens)
        d = self.d(layer)
        n_sel = sl.stop - sl.start
        if images is not None:
            chosen = np.flatnonzero(self._image_mask(images))
            for lo in range(0, len(chosen), batch_images):
                ids = chosen[lo : lo + batch_images]
                out = np.empty((len(ids), n_sel, d), dtype=np.float32)
                for row, image in enumerate(ids):
                    shard, local = self._locate(int(image))
                    out[row] = self._shard(layer, shard)[local, sl]
                yield ids.astype(np.int64), out
            return
        for start in range(0, self.n_images, batch_images):
            stop = min(start + batch_images, self.n_images)
            out = np.empty((stop - start, n_sel, d), dtype=np.float32)
            pos = start
            while pos < stop:
                shard, local = self._locate(pos)
                take = min(stop - pos, int(self._images[shard]) - local)
                out[pos - start : pos - start + take] = self._shard(layer, shard)[
                    local : local + take, sl
                ]
                pos += take
            yield np.arange(start, stop, dtype=np.int64), out

    def _selected(self, images: np.ndarray | None) -> np.ndarray:
        """Sorted distinct store image indices of a selection (None: every image)."""
        mask = self._image_mask(images)
        if mask is None:
            return np.arange(self.n_images, dtype=np.int64)
        return np.flatnonzero(mask).astype(np.int64)

    def _read_images(self, layer: int, images: np.ndarray, sl: slice, out: np.ndarray) -> None:
        """Copy the `sl` tokens of `images` (sorted store indices) into `out` `[n, T_sel, d]`,
        shard by shard: runs of consecutive images are one slice copy each."""
        shards = np.searchsorted(self._starts, images, side="right") - 1
        cuts = np.flatnonzero(np.diff(shards)) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(images)], strict=True):
            shard = int(shards[lo])
            local = images[lo:hi] - self._starts[shard]
            arr = self._shard(layer, shard)
            breaks = np.flatnonzero(np.diff(local) != 1) + 1
            if len(breaks) >= _MAX_RUN_COPIES:
                out[lo:hi] = arr[local, sl]
                continue
            for a, b in zip([0, *breaks], [*breaks, len(local)], strict=True):
                out[lo + a : lo + b] = arr[local[a] : local[a] + (b - a), sl]

    def _gather_tokens(
        self, layer: int, images: np.ndarray, positions: np.ndarray, out: np.ndarray
    ) -> None:
        """`out[i] = token positions[i] of store image images[i]`, in any order; each shard is
        mapped once."""
        order = np.argsort(images, kind="stable")
        shards = np.searchsorted(self._starts, images[order], side="right") - 1
        cuts = np.flatnonzero(np.diff(shards)) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(order)], strict=True):
            shard = int(shards[lo])
            rows = order[lo:hi]
            arr = self._shard(layer, shard)
            out[rows] = arr[images[rows] - self._starts[shard], positions[rows]]

    def shuffled(
        self,
        layer: int,
        tokens: str = "patch",
        batch_size: int = 4096,
        seed: int = 0,
        epoch: int = 0,
        prefetch: int = 2,
        buffer_tokens: int = 1 << 18,
        images: np.ndarray | None = None,
        block_images: int = 1,
        start_batch: int = 0,
    ) -> Iterator[np.ndarray]:
        """One epoch of `[<= batch_size, d]` float32 batches, each a uniform draw over the
        selected images, in a seeded order.

        The selected images are cut into blocks of `block_images` consecutive ones, and the
        blocks put in a random order; windows of consecutive blocks (at least `buffer_tokens`
        tokens) are read in turn, each sorted for locality, and their tokens, with those left
        over from the previous window, are drawn from by a random permutation. So a batch mixes
        images from the whole store (a store sorted by class gives batches of every class),
        every selected token comes exactly once per epoch and only the last batch is short.

        The order depends only on (seed, epoch, batch_size, buffer_tokens, block_images) and
        the selection, never on `prefetch` (batches built that many ahead in a background
        thread; 0 = inline). `images` (store image indices) restricts the epoch to those
        images, e.g. to hold some out for evaluation. `start_batch` yields the batches from
        that one on, exactly those of the full epoch, without reading the windows before it
        (a resumed trainer).
        """
        if batch_size < 1:
            raise VisaeError(f"batch_size must be positive, not {batch_size}")
        if buffer_tokens < 1:
            raise VisaeError(f"buffer_tokens must be positive, not {buffer_tokens}")
        if block_images < 1:
            raise VisaeError(f"block_images must be positive, not {block_images}")
        start_batch = _non_negative("start_batch", start_batch)
        seed, epoch = _non_negative("seed", seed), _non_negative("epoch", epoch)
        sl = self._token_slice(layer, tokens)
        plan = self._epoch_plan(
            self._selected(images),
            sl.stop - sl.start,
            batch_size,
            buffer_tokens,
            block_images,
            seed,
            epoch,
        )
        items = self._shuffled_batches(layer, sl, batch_size, plan, seed, epoch, start_batch)
        if prefetch > 0:
            return _prefetched(items, prefetch)
        return items

    @staticmethod
    def _epoch_plan(
        selected: np.ndarray,
        n_sel: int,
        batch_size: int,
        buffer_tokens: int,
        block_images: int,
        seed: int,
        epoch: int,
    ) -> _EpochPlan:
        n_blocks = math.ceil(len(selected) / block_images)
        blocks = np.random.default_rng([seed, epoch, 0]).permutation(n_blocks)
        idx = (blocks[:, None] * block_images + np.arange(block_images)).ravel()
        order = selected[idx[idx < len(selected)]]
        # block sizes in visiting order (only the last block of `selected` may be short)
        sizes = np.minimum(block_images, len(selected) - blocks * block_images)
        per_window = max(1, math.ceil(buffer_tokens / (block_images * n_sel)))
        ends = np.cumsum(sizes)[per_window - 1 :: per_window]
        bounds = np.unique(np.concatenate([[0], ends, [len(order)]])).astype(np.int64)
        new = np.diff(bounds) * n_sel
        before = np.cumsum(new) - new
        first = np.append(before // batch_size, math.ceil(len(order) * n_sel / batch_size))
        return _EpochPlan(order, bounds, before % batch_size, first.astype(np.int64))

    def _shuffled_batches(
        self,
        layer: int,
        sl: slice,
        batch_size: int,
        plan: _EpochPlan,
        seed: int,
        epoch: int,
        start_batch: int,
    ) -> Iterator[np.ndarray]:
        if start_batch >= plan.n_batches:
            return
        d = self.d(layer)
        n_sel = sl.stop - sl.start
        dtype = np.dtype(self.dtype)
        # the window holding batch `start_batch`; the tokens it inherits are found by replaying
        # the permutations (no data) from the last window before it that inherits none
        first = int(np.searchsorted(plan.first_batch[:-1], start_batch, side="right")) - 1
        replay = int(np.flatnonzero(plan.carry_in[: first + 1] == 0)[-1])
        carry_ids = np.empty(0, dtype=np.int64)
        for w in range(replay, first):
            imgs = np.sort(plan.order[plan.bounds[w] : plan.bounds[w + 1]])
            ids = np.concatenate([carry_ids, (imgs[:, None] * n_sel + np.arange(n_sel)).ravel()])
            perm = np.random.default_rng([seed, epoch, 1 + w]).permutation(len(ids))
            carry_ids = ids[perm[len(ids) // batch_size * batch_size :]]
        carry = np.empty((len(carry_ids), d), dtype=dtype)
        if len(carry_ids):
            self._gather_tokens(layer, carry_ids // n_sel, sl.start + carry_ids % n_sel, carry)
        for w in range(first, plan.n_windows):
            imgs = np.sort(plan.order[plan.bounds[w] : plan.bounds[w + 1]])
            count = len(carry) + len(imgs) * n_sel
            buf = np.empty((count, d), dtype=dtype)
            buf[: len(carry)] = carry
            self._read_images(layer, imgs, sl, buf[len(carry) :].reshape(len(imgs), n_sel, d))
            perm = np.random.default_rng([seed, epoch, 1 + w]).permutation(count)
            n_full = count // batch_size
            last = w == plan.n_windows - 1
            n_out = n_full + int(last and count > n_full * batch_size)
            skip = max(0, start_batch - int(plan.first_batch[w]))
            for b in range(skip, n_out):
                yield _rows_float32(buf, perm[b * batch_size : (b + 1) * batch_size])
            carry = buf[perm[n_full * batch_size :]]

    def sample_tokens(
        self,
        layer: int,
        tokens: str,
        n: int,
        seed: int,
        images: np.ndarray | None = None,
    ) -> np.ndarray:
        """`[min(n, available), d]` float32: `n` distinct tokens drawn uniformly from the selected
        images (every selected token equally likely), in random order, seeded.

        Only the images holding a drawn token are read, and memory stays O(n) whatever the
        store's size: for the normalisation statistics, calibration and evaluation sets.
        """
        if not isinstance(n, int | np.integer) or n < 0:
            raise VisaeError(f"n must be a non-negative integer, not {n!r}")
        rng = np.random.default_rng([_non_negative("seed", seed), 1])
        sl = self._token_slice(layer, tokens)
        n_sel = sl.stop - sl.start
        selected = self._selected(images)
        flat = _distinct(rng, len(selected) * n_sel, min(int(n), len(selected) * n_sel))
        flat = flat[rng.permutation(len(flat))]
        out = np.empty((len(flat), self.d(layer)), dtype=np.float32)
        if len(flat):
            self._gather_tokens(layer, selected[flat // n_sel], sl.start + flat % n_sel, out)
        return out
