"""Reading an activation store: verified opening, ordered reads for analysis, seeded
shuffled reads for training, and random access. Shards are memory-mapped; every read
returns float32."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from visae.errors import VisaeError
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


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{size:.1f} TiB"


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
        verify: bool = True,
        allow_incomplete: bool = False,
        progress: bool = True,
    ) -> ActivationStore:
        """Open a store. `verify` checks every file's sha256 (streamed); without it only
        file sizes are checked. An incomplete store needs `allow_incomplete=True`."""
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

    def _check_files(self, *, verify: bool, progress: bool) -> None:
        files = [
            (rel, info) for shard in self.manifest["shards"] for rel, info in shard["files"].items()
        ]
        for rel, info in files:
            f = self.path / rel
            if not f.is_file():
                raise VisaeError(f"store {self.path}: file {rel} is missing")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise VisaeError(
                    f"store {self.path}: {rel} is truncated or damaged "
                    f"({size} bytes, the manifest says {info['bytes']})"
                )
        if not verify:
            return
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
        with bar, ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for rel, ok in pool.map(digest, files):
                if not ok:
                    raise VisaeError(
                        f"store {self.path}: checksum mismatch in {rel} (the file is corrupted)"
                    )

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
        """What a downstream artifact records about the data it came from."""
        return {
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
            f"images       {self.n_images} in {self.n_shards} shards of up to {m['shard_images']}",
            f"skipped      {len(m['skipped'])} unreadable images",
            f"tokens       {m['tokens']}",
            f"dtype        {m['dtype']}",
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
    ) -> Iterator[np.ndarray]:
        """One epoch of `[<= batch_size, d]` float32 batches in a seeded random order.

        Shards are visited in a random order; groups of them (at least `buffer_tokens`
        tokens, plus the remainder of the previous group) are loaded into memory and drawn
        from by a random permutation, so every selected token comes exactly once per epoch.
        The order depends only on (seed, epoch, batch_size, buffer_tokens), never on
        `prefetch` (batches built that many ahead in a background thread; 0 = inline).
        `images` (store image indices) restricts the epoch to those images, e.g. to hold
        some out for evaluation.
        """
        if batch_size < 1:
            raise VisaeError(f"batch_size must be positive, not {batch_size}")
        if buffer_tokens < 1:
            raise VisaeError(f"buffer_tokens must be positive, not {buffer_tokens}")
        sl = self._token_slice(layer, tokens)
        rng = np.random.default_rng([int(seed), int(epoch)])
        keep = self._image_mask(images)
        items = self._shuffled_batches(layer, sl, batch_size, buffer_tokens, rng, keep)
        if prefetch > 0:
            return _prefetched(items, prefetch)
        return items

    def _shuffled_batches(
        self,
        layer: int,
        sl: slice,
        batch_size: int,
        buffer_tokens: int,
        rng: np.random.Generator,
        keep: np.ndarray | None,
    ) -> Iterator[np.ndarray]:
        d = self.d(layer)
        n_sel = sl.stop - sl.start
        dtype = np.dtype(self.dtype)
        if keep is None:
            kept = self._images
        else:
            upto = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
            kept = upto[self._starts[1:]] - upto[self._starts[:-1]]
        order = [int(s) for s in rng.permutation(self.n_shards) if kept[s] > 0]
        carry = np.empty((0, d), dtype=dtype)
        i = 0
        while i < len(order):
            group: list[int] = []
            count = len(carry)
            while i < len(order) and (count < buffer_tokens or not group):
                group.append(order[i])
                count += int(kept[order[i]]) * n_sel
                i += 1
            buf = np.empty((count, d), dtype=dtype)
            buf[: len(carry)] = carry
            off = len(carry)
            for s in group:
                arr = self._shard(layer, s)
                if keep is not None and kept[s] < arr.shape[0]:
                    arr = arr[keep[self._starts[s] : self._starts[s + 1]]]
                n = arr.shape[0] * n_sel
                buf[off : off + n].reshape(arr.shape[0], n_sel, d)[...] = arr[:, sl]
                off += n
            perm = rng.permutation(count)
            last = i == len(order)
            n_full = count // batch_size
            for b in range(n_full):
                yield buf[perm[b * batch_size : (b + 1) * batch_size]].astype(np.float32)
            rest = perm[n_full * batch_size :]
            if last:
                if len(rest):
                    yield buf[rest].astype(np.float32)
            else:
                carry = buf[rest]
