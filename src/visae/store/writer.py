"""Writing an activation store shard by shard: atomic, resumable, and refusing to mix data
from another model, preprocessing, dataset or layout into an existing store."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from visae.atomic import is_tmp_name, write_file
from visae.errors import VisaeError
from visae.store.checks import VerifiedFiles
from visae.store.format import (
    AUTOCAST_CHOICES,
    DTYPES,
    FORMAT_NAME,
    MANIFEST,
    METADATA_DIR,
    PARTS_DIR,
    SCHEMA_VERSION,
    TOKEN_CHOICES,
    dumps_json,
    dumps_json_line,
    kinds_runs,
    layer_dir,
    metadata_file,
    normalise_json,
    part_file,
    shard_file,
    stored_selection,
)

if TYPE_CHECKING:
    from visae.backbones.base import TokenLayout

logger = logging.getLogger("visae.store")

_SHARD_NAME = re.compile(r"^shard_(\d{5})\.(npy|jsonl|json)$")


def _layout_dict(layout: TokenLayout | Mapping[str, Any]) -> dict[str, Any]:
    raw = layout if isinstance(layout, Mapping) else layout.to_dict()
    try:
        out = {
            "n_cls": int(raw["n_cls"]),
            "n_registers": int(raw["n_registers"]),
            "grid": [int(raw["grid"][0]), int(raw["grid"][1])],
        }
    except (KeyError, IndexError, TypeError, ValueError):
        raise VisaeError(f"not a token layout: {dict(raw)!r}") from None
    if min(out["n_cls"], out["n_registers"], *out["grid"]) < 0:
        raise VisaeError(f"token layout has a negative count: {out}")
    return out


@dataclass(frozen=True)
class LayerSpec:
    """One recorded layer: its width and the model's token layout there (a `TokenLayout`
    or its dict form)."""

    layer: int
    d: int
    layout: TokenLayout | Mapping[str, Any]


@dataclass(frozen=True)
class StoreSpec:
    """Everything that identifies a store's contents; resuming requires an equal spec.

    `backbone`: `{"name", "weights_hash", "preprocessing"}`; `dataset`: `{"name",
    "fingerprint"}` and, where the dataset has one, the `spec` that reopens it (where the
    images are, not what they are: a resumed store keeps the spec it was started with).
    `tokens` chooses which tokens are kept ("all", "patch" or "cls"); `autocast` is the
    reduced precision the backbone ran under ("bf16", "fp16"; None: full precision).
    """

    backbone: Mapping[str, Any]
    dataset: Mapping[str, Any]
    layers: Sequence[LayerSpec]
    dtype: str = "float16"
    tokens: str = "all"
    shard_images: int = 256
    autocast: str | None = None
    _layers: list[dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("name", "weights_hash", "preprocessing"):
            if key not in self.backbone:
                raise VisaeError(f"store spec: backbone lacks {key!r}")
        for key in ("name", "fingerprint"):
            if key not in self.dataset:
                raise VisaeError(f"store spec: dataset lacks {key!r}")
        if self.dtype not in DTYPES:
            raise VisaeError(f"store dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.tokens not in TOKEN_CHOICES:
            raise VisaeError(
                f"tokens must be one of {', '.join(TOKEN_CHOICES)}, not {self.tokens!r}"
            )
        if self.autocast is not None and self.autocast not in AUTOCAST_CHOICES:
            raise VisaeError(
                f"autocast must be one of {', '.join(AUTOCAST_CHOICES)} or None, "
                f"not {self.autocast!r}"
            )
        if not isinstance(self.shard_images, int) or self.shard_images < 1:
            raise VisaeError(f"shard_images must be a positive integer, not {self.shard_images!r}")
        if not self.layers:
            raise VisaeError("store spec names no layers")
        numbers = [int(ls.layer) for ls in self.layers]
        if len(set(numbers)) != len(numbers):
            raise VisaeError(f"store spec repeats a layer: {numbers}")
        entries = []
        for ls in sorted(self.layers, key=lambda x: int(x.layer)):
            if int(ls.layer) < 0:
                raise VisaeError(f"layer {ls.layer} is negative")
            if int(ls.d) < 1:
                raise VisaeError(f"layer {ls.layer}: width d must be positive, not {ls.d}")
            model_layout = _layout_dict(ls.layout)
            try:
                start, stop, stored = stored_selection(model_layout, self.tokens)
            except VisaeError as e:
                raise VisaeError(f"layer {ls.layer}: {e}") from None
            entries.append(
                {
                    "layer": int(ls.layer),
                    "d": int(ls.d),
                    "dir": layer_dir(int(ls.layer)),
                    "model_layout": model_layout,
                    "model_tokens": [start, stop],
                    "layout": stored,
                    "kinds": kinds_runs(stored),
                    "n_tokens": stop - start,
                }
            )
        object.__setattr__(self, "_layers", entries)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> StoreSpec:
        """The spec a store was written with (to resume or finish it without its backbone)."""
        try:
            return cls(
                backbone=manifest["backbone"],
                dataset=manifest["dataset"],
                layers=[
                    LayerSpec(e["layer"], e["d"], e["model_layout"]) for e in manifest["layers"]
                ],
                dtype=manifest["dtype"],
                tokens=manifest["tokens"],
                shard_images=manifest["shard_images"],
                autocast=manifest.get("autocast"),
            )
        except (KeyError, TypeError) as e:
            raise VisaeError(f"manifest lacks a store spec field: {e}") from None

    @property
    def layer_entries(self) -> list[dict[str, Any]]:
        """The manifest's `layers` list for this spec (sorted by layer)."""
        return [dict(e) for e in self._layers]

    def manifest_header(self) -> dict[str, Any]:
        """The manifest of an empty store with this spec."""
        return normalise_json(
            {
                "schema_version": SCHEMA_VERSION,
                "format": FORMAT_NAME,
                "backbone": dict(self.backbone),
                "dataset": dict(self.dataset),
                "dtype": self.dtype,
                "tokens": self.tokens,
                "shard_images": self.shard_images,
                "autocast": self.autocast,
                "layers": self._layers,
                "shards": [],
                "n_images": 0,
                "skipped": [],
                "complete": False,
            }
        )


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise VisaeError(f"disk full while creating {path}") from None
        raise VisaeError(f"cannot create {path}: {e.strerror or e}") from None


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _identity(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset entry without its `spec`: where the images are is not what they are."""
    return {k: v for k, v in dataset.items() if k != "spec"}


def _spec_difference(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """The first spec field in which two manifests differ, as `field (store: a, requested:
    b)`, or None. Named fields first, so the message says *what* differs. Manifests written
    before `autocast` existed are full precision."""
    checks: list[tuple[str, Any, Any]] = [
        ("backbone name", have["backbone"].get("name"), want["backbone"]["name"]),
        (
            "backbone weights_hash (another model)",
            have["backbone"].get("weights_hash"),
            want["backbone"]["weights_hash"],
        ),
        (
            "preprocessing",
            have["backbone"].get("preprocessing"),
            want["backbone"]["preprocessing"],
        ),
        ("backbone", have["backbone"], want["backbone"]),
        ("dataset fingerprint", have["dataset"].get("fingerprint"), want["dataset"]["fingerprint"]),
        ("dataset name", have["dataset"].get("name"), want["dataset"]["name"]),
        ("dataset", _identity(have["dataset"]), _identity(want["dataset"])),
        (
            "layers",
            [e.get("layer") for e in have["layers"]],
            [e["layer"] for e in want["layers"]],
        ),
        ("dtype", have["dtype"], want["dtype"]),
        ("autocast", have.get("autocast"), want["autocast"]),
        ("tokens", have["tokens"], want["tokens"]),
        ("shard_images", have["shard_images"], want["shard_images"]),
    ]
    for h, w in zip(have["layers"], want["layers"], strict=True):
        checks.append((f"layer {w['layer']} width d", h.get("d"), w["d"]))
        checks.append(
            (f"layer {w['layer']} token layout", h.get("model_layout"), w["model_layout"])
        )
    for name, a, b in checks:
        if a != b:
            return f"{name} (store: {_short(a)}, requested: {_short(b)})"
    return None


class _ShardFiles:
    """What every writer of shard files shares: the checks and the bytes of one shard."""

    def __init__(self, path: Path, spec: StoreSpec, allow_nonfinite: bool) -> None:
        self.path = path
        self.spec = spec
        self.allow_nonfinite = allow_nonfinite
        self._entries = {e["layer"]: e for e in spec.layer_entries}

    def _lines(self, metadata: Sequence[Mapping[str, Any]], first_image: int) -> bytes:
        lines = []
        for i, m in enumerate(metadata):
            try:
                lines.append(dumps_json_line(dict(m)))
            except (TypeError, ValueError) as e:
                raise VisaeError(
                    f"metadata of image {first_image + i} is not JSON-able: {e}"
                ) from None
        return "".join(lines).encode("utf-8")

    def _prepare(
        self,
        acts_by_layer: Mapping[int, np.ndarray],
        metadata: Sequence[Mapping[str, Any]],
        first_image: int,
    ) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
        """Check shapes, cast to the store dtype, and find non-finite values; returns the
        arrays to write and the non-finite records (empty unless allowed), which number
        images from `first_image`."""
        n = len(metadata)
        if set(acts_by_layer) != set(self._entries):
            missing = sorted(set(self._entries) - set(acts_by_layer))
            extra = sorted(set(acts_by_layer) - set(self._entries))
            raise VisaeError(
                f"append_shard needs exactly the store's layers {sorted(self._entries)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; not in the store {extra}" if extra else "")
            )
        out: dict[int, np.ndarray] = {}
        nonfinite: list[dict[str, Any]] = []
        for layer, e in self._entries.items():
            acts = np.asarray(acts_by_layer[layer])
            want = (n, e["n_tokens"], e["d"])
            if acts.shape != want:
                raise VisaeError(
                    f"layer {layer}: got activations of shape {list(acts.shape)}, expected "
                    f"{list(want)} ({n} images x {e['n_tokens']} {self.spec.tokens} tokens x d)"
                )
            if not np.issubdtype(acts.dtype, np.floating):
                raise VisaeError(f"layer {layer}: activations must be floats, not {acts.dtype}")
            with np.errstate(over="ignore"):
                cast = np.ascontiguousarray(acts, dtype=self.spec.dtype)
            bad_images = np.flatnonzero(~np.isfinite(cast).reshape(n, -1).all(axis=1))
            for i in bad_images:
                gi = first_image + int(i)
                source = metadata[i].get("source", "?")
                overflow = bool(np.isfinite(acts[i]).all())
                if not self.allow_nonfinite:
                    what = (
                        f"values beyond the {self.spec.dtype} range (use dtype float32)"
                        if overflow
                        else "non-finite activations (NaN/inf)"
                    )
                    raise VisaeError(
                        f"layer {layer}: {what} in image {gi} (source: {source}); nothing written"
                    )
                nonfinite.append({"image": gi, "layer": layer, "source": source})
                logger.warning(
                    "layer %d: non-finite activations in image %d (source: %s)", layer, gi, source
                )
            out[layer] = cast
        return out, nonfinite

    def _write_files(
        self, index: int, arrays: Mapping[int, np.ndarray], blob: bytes
    ) -> dict[str, dict[str, Any]]:
        """Shard `index`'s per-layer arrays and metadata lines, each committed atomically;
        returns `{relative path: {"bytes", "sha256"}}`."""
        files: dict[str, dict[str, Any]] = {}
        for layer, arr in arrays.items():
            rel = shard_file(layer, index)
            _mkdir(self.path / self._entries[layer]["dir"])

            def write_npy(f: Any, arr: np.ndarray = arr) -> None:
                np.lib.format.write_array(f, arr, version=(1, 0), allow_pickle=False)

            files[rel] = write_file(self.path / rel, write_npy)
        rel = metadata_file(index)
        _mkdir(self.path / METADATA_DIR)
        files[rel] = write_file(self.path / rel, lambda f: f.write(blob))
        return files


class StoreWriter(_ShardFiles):
    """Creates a store, or resumes the one already at `path` if it has the same spec.

    Each `append_shard` writes one shard per layer plus its metadata, each to a temporary
    name, fsynced and renamed; the manifest is rewritten last, so a kill at any point
    leaves a store whose manifest lists only whole files. Resuming removes leftovers and
    continues after the last listed shard. The directory is locked while a writer is open.
    """

    def __init__(
        self, path: str | os.PathLike[str], spec: StoreSpec, *, allow_nonfinite: bool = False
    ) -> None:
        super().__init__(Path(path), spec, allow_nonfinite)
        self._lock_fd: int | None = None
        if self.path.exists() and not self.path.is_dir():
            raise VisaeError(f"store path {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VisaeError(f"cannot create store directory {self.path}: {e.strerror}") from None
        self._checked = VerifiedFiles(self.path)
        self._lock()
        try:
            if (self.path / MANIFEST).exists():
                self.manifest = self._resume()
                self.resumed = True
                self.adopt_parts()
            else:
                self._check_empty()
                self.manifest = spec.manifest_header()
                self._write_manifest()
                self.resumed = False
        except BaseException:
            self._unlock()
            raise

    # -- state -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def n_images(self) -> int:
        return int(self.manifest["n_images"])

    @property
    def n_skipped(self) -> int:
        return len(self.manifest["skipped"])

    # -- opening -------------------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VisaeError(f"store {self.path} is being written by another writer") from None
        self._lock_fd = fd

    def _check_empty(self) -> None:
        """A directory without a manifest is only ours if it holds nothing but our temporary
        files (a writer killed before its first manifest)."""
        for entry in self.path.iterdir():
            if entry.is_file() and is_tmp_name(entry.name):
                entry.unlink()
            else:
                raise VisaeError(
                    f"{self.path} is not empty and has no {MANIFEST}: not a visae store; "
                    "choose a new or empty directory"
                )

    def _resume(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VisaeError(f"cannot read {self.path / MANIFEST}: {e}") from None
        if manifest.get("format") != FORMAT_NAME:
            raise VisaeError(f"{self.path / MANIFEST} is not a visae activation-store manifest")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise VisaeError(
                f"store {self.path} has schema version {manifest.get('schema_version')}; "
                f"this visae writes version {SCHEMA_VERSION}"
            )
        want = self.spec.manifest_header()
        if len(manifest.get("layers", [])) != len(want["layers"]):
            diff: str | None = (
                f"layers (store: {[e.get('layer') for e in manifest.get('layers', [])]}, "
                f"requested: {[e['layer'] for e in want['layers']]})"
            )
        else:
            diff = _spec_difference(manifest, want)
        if diff is not None:
            raise VisaeError(f"refusing to write into {self.path}: its store differs in {diff}")
        self._clean(manifest)
        for shard in manifest["shards"]:
            for rel, info in shard["files"].items():
                f = self.path / rel
                if not f.is_file():
                    raise VisaeError(f"cannot resume {self.path}: listed file {rel} is missing")
                if f.stat().st_size != info["bytes"]:
                    raise VisaeError(
                        f"cannot resume {self.path}: {rel} has {f.stat().st_size} bytes, "
                        f"the manifest says {info['bytes']}"
                    )
        return manifest

    def _clean(self, manifest: dict[str, Any]) -> None:
        """Remove temporary files and shards written after the last manifest update or part
        record (their writer was killed before it could list them; they will be written
        again)."""
        listed = {rel for shard in manifest["shards"] for rel in shard["files"]}
        parts = self.path / PARTS_DIR
        for entry in parts.glob("shard_*.json") if parts.is_dir() else []:
            listed |= {entry.relative_to(self.path).as_posix(), *_read_part(entry)["files"]}
        dirs = [self.path, parts, self.path / METADATA_DIR]
        dirs += [self.path / e["dir"] for e in manifest["layers"]]
        for d in dirs:
            if not d.is_dir():
                continue
            for entry in d.iterdir():
                if not entry.is_file() and not entry.is_symlink():
                    continue
                rel = entry.relative_to(self.path).as_posix()
                orphan = d != self.path and _SHARD_NAME.match(entry.name) and rel not in listed
                if is_tmp_name(entry.name) or orphan:
                    entry.unlink()

    # -- writing -------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        text = dumps_json(self.manifest).encode("utf-8")
        write_file(self.path / MANIFEST, lambda f: f.write(text))

    def append_shard(
        self,
        acts_by_layer: Mapping[int, np.ndarray],
        metadata: Sequence[Mapping[str, Any]],
        skipped: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Write one shard: `acts_by_layer[layer]` is `[n, stored tokens, d]` for every
        layer of the store, `metadata` one JSON-able dict per image, `skipped` the images
        of this shard's input that could not be read (recorded in the manifest)."""
        if self.complete:
            raise VisaeError(f"store {self.path} is complete; nothing can be appended")
        if self._lock_fd is None:
            raise VisaeError(f"writer for {self.path} is closed")
        n = len(metadata)
        if n > self.spec.shard_images:
            raise VisaeError(
                f"a shard holds at most shard_images={self.spec.shard_images} images, got {n}"
            )
        blob = self._lines(metadata, self.n_images)
        skipped_json = _skipped_json(skipped)
        arrays, nonfinite = self._prepare(acts_by_layer, metadata, self.n_images)
        index = self.n_shards
        files = self._write_files(index, arrays, blob)
        for rel, info in files.items():  # written and hashed just now: no reader re-hashes them
            self._checked.record(rel, (self.path / rel).stat(), info["sha256"])
        self._list_shards([(n, files, nonfinite, skipped_json)])
        (self.path / part_file(index)).unlink(missing_ok=True)

    def _list_shards(
        self,
        shards: Sequence[
            tuple[int, dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]
        ],
    ) -> None:
        """Append `(images, files, nonfinite, skipped)` shards, in order, to the manifest and
        write it once."""
        previous = self.manifest
        records, skipped, n_images = [], [], self.n_images
        for i, (n, files, nonfinite, skipped_json) in enumerate(shards):
            record: dict[str, Any] = {
                "index": self.n_shards + i,
                "images": n,
                "first_image": n_images,
                "files": files,
            }
            if nonfinite:
                record["nonfinite"] = nonfinite
            records.append(record)
            skipped.extend(skipped_json)
            n_images += n
        self.manifest = {
            **previous,
            "shards": [*previous["shards"], *records],
            "n_images": n_images,
            "skipped": [*previous["skipped"], *skipped],
        }
        try:
            self._write_manifest()
        except BaseException:
            self.manifest = previous
            raise

    # -- shards written by other processes ---------------------------------------------------

    def parts(self) -> dict[int, dict[str, Any]]:
        """The records of shards that ranks of a distributed extraction wrote and the manifest
        does not list yet, by shard index (each one checked against the files it names)."""
        found: dict[int, dict[str, Any]] = {}
        folder = self.path / PARTS_DIR
        if not folder.is_dir():
            return found
        for entry in sorted(folder.iterdir()):
            match = _SHARD_NAME.match(entry.name)
            if not match or match.group(2) != "json":
                continue
            index = int(match.group(1))
            if index < self.n_shards:  # listed already; its record outlived a kill
                entry.unlink()
                continue
            record = _read_part(entry)
            for rel, info in record["files"].items():
                f = self.path / rel
                if not f.is_file() or f.stat().st_size != info["bytes"]:
                    raise VisaeError(f"{entry} names {rel}, which is missing or truncated")
            found[index] = record
        return found

    def adopt_parts(self) -> None:
        """List, in the manifest, the shards in `parts()` that continue it without a gap, and
        drop their records."""
        if self._lock_fd is None:
            raise VisaeError(f"writer for {self.path} is closed")
        parts = self.parts()
        run = []
        while self.n_shards + len(run) in parts:
            record = parts[self.n_shards + len(run)]
            run.append(record)
        if not run:
            return
        first = self.n_images
        shards = []
        for record in run:
            nonfinite = [{**bad, "image": first + bad["image"]} for bad in record["nonfinite"]]
            shards.append((record["images"], record["files"], nonfinite, record["skipped"]))
            first += record["images"]
        self._list_shards(shards)
        for record in run:
            (self.path / part_file(record["index"])).unlink(missing_ok=True)

    def finish(self) -> None:
        """Mark the store complete (a no-op if it already is) and release the lock."""
        if not self.complete:
            if self._lock_fd is None:
                raise VisaeError(f"writer for {self.path} is closed")
            stranded = sorted(self.parts())
            if stranded:
                raise VisaeError(
                    f"store {self.path}: shards {stranded} are written but do not "
                    "follow the listed ones; run the extraction again to fill the gap"
                )
            with contextlib.suppress(FileNotFoundError):
                (self.path / PARTS_DIR).rmdir()
            self.manifest = {**self.manifest, "complete": True}
            try:
                self._write_manifest()
            except BaseException:
                self.manifest = {**self.manifest, "complete": False}
                raise
        self.close()

    def close(self) -> None:
        """Release the directory lock without marking the store complete (and record the
        files written as verified, see `visae.store.checks`)."""
        if self._lock_fd is not None:
            self._checked.save(keep=[r for s in self.manifest["shards"] for r in s["files"]])
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PartWriter(_ShardFiles):
    """Writes whole shards of a store that another process (rank 0 of a distributed
    extraction) holds open: each shard's files, then its record in `parts/`, so that a kill
    leaves either a recorded shard or files the next opening removes. The holder lists the
    records in the manifest (`StoreWriter.adopt_parts`)."""

    def __init__(
        self, path: str | os.PathLike[str], spec: StoreSpec, *, allow_nonfinite: bool = False
    ) -> None:
        super().__init__(Path(path), spec, allow_nonfinite)
        if not (self.path / MANIFEST).is_file():
            raise VisaeError(f"{self.path} has no {MANIFEST}: the store is not open for parts")

    def write(
        self,
        index: int,
        acts_by_layer: Mapping[int, np.ndarray],
        metadata: Sequence[Mapping[str, Any]],
        skipped: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Write shard `index` (arguments as `StoreWriter.append_shard`); non-finite values
        are recorded by their image's place in the shard until the shard is listed."""
        if len(metadata) > self.spec.shard_images:
            raise VisaeError(
                f"a shard holds at most shard_images={self.spec.shard_images} images, "
                f"got {len(metadata)}"
            )
        blob = self._lines(metadata, 0)
        record = {
            "index": index,
            "images": len(metadata),
            "skipped": _skipped_json(skipped),
        }
        arrays, nonfinite = self._prepare(acts_by_layer, metadata, 0)
        record["files"] = self._write_files(index, arrays, blob)
        record["nonfinite"] = nonfinite
        _mkdir(self.path / PARTS_DIR)
        text = dumps_json(record).encode("utf-8")
        write_file(self.path / part_file(index), lambda f: f.write(text))


def _read_part(entry: Path) -> dict[str, Any]:
    """A shard's record in `parts/` (written whole by `PartWriter`)."""
    try:
        record: dict[str, Any] = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VisaeError(f"cannot read {entry}: {e}") from None
    return record


def _skipped_json(skipped: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    try:
        return normalise_json([dict(s) for s in skipped])
    except (TypeError, ValueError) as e:
        raise VisaeError(f"skipped-image records are not JSON-able: {e}") from None
