"""The analysis artifact on disk: file names, the per-latent table, and the `Analysis` loader
that the browser, the evaluation suite and the human-study server all read through.

See docs/analysis-format.md for the format itself.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from visae.analysis.accumulate import HistogramSpec
from visae.atomic import fsync_dir, tmp_path, write_bytes, write_error, write_text
from visae.errors import VisaeError

SCHEMA_VERSION = 1
FORMAT_NAME = "visae.analysis"
META_FILE = "analysis.json"
LATENTS_FILE = "latents.csv"
METRICS_FILE = "metrics.csv"
TEXTS_FILE = "texts.csv"
COLUMNS_FILE = "columns.json"
# the files that extra per-latent columns live in, and the journal that commits a write of them
EXTRA_FILES = (METRICS_FILE, TEXTS_FILE, COLUMNS_FILE)
COMMIT_FILE = ".columns.commit"
PENDING_SUFFIX = ".pending"
IMAGES_FILE = "images.json"
HIST_FILE = "hist.npy"
TOP_DIR = "top"
CODES_DIR = "codes"
THUMBS_DIR = "thumbs"
PLOTS_DIR = "plots"
RANKINGS = ("max", "mean", "cls")

# columns of latents.csv, in order; (name, kind) with kind "int", "float" or "str"
LATENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("latent", "int"),
    ("dead", "int"),
    ("freq_patch", "float"),
    ("freq_image", "float"),
    ("freq_cls", "float"),
    ("mean_patch", "float"),
    ("mean_active", "float"),
    ("max_patch", "float"),
    ("mean_cls", "float"),
    ("max_cls", "float"),
    ("fire_patch", "int"),
    ("fire_image", "int"),
    ("fire_cls", "int"),
    ("top_label", "str"),
    ("top_label_frac", "float"),
    ("top_label_base", "float"),
)

_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def top_file(ranking: str, part: str) -> str:
    """`top/<ranking>_<part>.npy`; part: values, images, map_ptr, map_patch, map_value."""
    return f"{TOP_DIR}/{ranking}_{part}.npy"


def thumb_file(image: int) -> str:
    return f"{THUMBS_DIR}/{image:07d}.jpg"


def format_float(x: float) -> str:
    """Shortest text that reads back to the same float64; empty for NaN (no value)."""
    return "" if math.isnan(x) else repr(float(x))


def table_text(columns: Mapping[str, np.ndarray | Sequence[Any]]) -> str:
    """A CSV table, column-wise; floats round-trip exactly, NaN is written empty."""
    names = list(columns)
    n = len(columns[names[0]])
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(names)
    for i in range(n):
        row = []
        for name in names:
            v = columns[name][i]
            if isinstance(v, float | np.floating):
                row.append(format_float(float(v)))
            else:
                row.append(str(v))
        w.writerow(row)
    return f.getvalue()


def write_table(path: Path, columns: Mapping[str, np.ndarray | Sequence[Any]]) -> None:
    path.write_text(table_text(columns), encoding="utf-8", newline="")


def read_table(
    path: Path, kinds: dict[str, str] | None = None, default: str = "float"
) -> dict[str, np.ndarray]:
    """Read a CSV written by `write_table`; columns not in `kinds` are read as `default`."""
    try:
        text = _read_utf8(path)
    except FileNotFoundError:
        raise VisaeError(f"cannot read {path}: no such file") from None
    return parse_table(text, path, kinds, default)


def parse_table(
    text: str, where: Path, kinds: dict[str, str] | None = None, default: str = "float"
) -> dict[str, np.ndarray]:
    """The columns of a CSV table's text (`where` names it in errors)."""
    kinds = kinds or {}
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise VisaeError(f"{where} is empty")
    header, body = rows[0], rows[1:]
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        kind = kinds.get(name, default)
        try:
            col = [r[j] for r in body]
            if kind == "int":
                out[name] = np.array([int(v) for v in col], dtype=np.int64)
            elif kind == "str":
                out[name] = np.array(col, dtype=object)
            else:
                out[name] = np.array([float(v) if v else math.nan for v in col])
        except (ValueError, IndexError):
            raise VisaeError(f"{where}: column {name!r} has a malformed value") from None
    return out


@dataclass(frozen=True)
class TopEntry:
    """One of a latent's top images: the image, its score under the ranking, and the latent's
    activation on each patch (`[h, w]`)."""

    image: int
    value: float
    map: np.ndarray


class Analysis:
    """Read access to an analysis artifact directory.

    Arrays are memory-mapped, so opening an analysis of any size is instant and a page of the
    browser reads only the rows it shows.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Analysis:
        root = Path(path)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise VisaeError(f"{root} is not a visae analysis (no {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise VisaeError(f"{meta_path} is not readable JSON: {e}") from None
        if meta.get("format") != FORMAT_NAME:
            raise VisaeError(f"{meta_path} is not a visae analysis (format {meta.get('format')!r})")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise VisaeError(
                f"{meta_path} has schema_version {version}; this visae reads {SCHEMA_VERSION}"
            )
        return cls(root, meta)

    # --- metadata ---

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def n_latents(self) -> int:
        return int(self.meta["sae"]["n_latents"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.meta["grid"]
        return int(h), int(w)

    @property
    def rankings(self) -> list[str]:
        return list(self.meta["rankings"])

    @property
    def top_n(self) -> int:
        return int(self.meta["top_n"])

    @property
    def n_images(self) -> int:
        return int(self.meta["n_images"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.meta["store"].get("dataset_fingerprint", ""))

    # --- per-latent table ---

    @cached_property
    def table(self) -> dict[str, np.ndarray]:
        """Columns of latents.csv, one entry per latent."""
        table = read_table(self._file(LATENTS_FILE), dict(LATENT_COLUMNS))
        missing = [c for c, _ in LATENT_COLUMNS if c not in table]
        if missing:
            raise VisaeError(f"{self.path / LATENTS_FILE} lacks columns {', '.join(missing)}")
        if len(table["latent"]) != self.n_latents or not np.array_equal(
            table["latent"], np.arange(self.n_latents)
        ):
            raise VisaeError(
                f"{self.path / LATENTS_FILE} does not list latents 0..{self.n_latents - 1}"
            )
        return table

    @property
    def dead(self) -> np.ndarray:
        return self.table["dead"].astype(bool)

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Extra numeric per-latent columns added after the pass (e.g. by the evaluation
        suite); NaN where a latent has no value."""
        cols = self._extra_table(METRICS_FILE, "float")
        return {k: v for k, v in cols.items() if k != "latent"}

    @property
    def texts(self) -> dict[str, list[str | None]]:
        """Extra text per-latent columns (e.g. a latent's best-matched concept); None where a
        latent has no value."""
        cols = self._extra_table(TEXTS_FILE, "str")
        return {k: [str(x) or None for x in v] for k, v in cols.items() if k != "latent"}

    @property
    def sources(self) -> dict[str, str]:
        """Where each extra column came from (e.g. the evaluation folder), for the columns
        added with a `source`."""
        text = self._extra_text(COLUMNS_FILE)
        if text is None:
            return {}
        sources = _json_key(text, self.path / COLUMNS_FILE, "sources")
        if not isinstance(sources, dict):
            raise VisaeError(f"{self.path / COLUMNS_FILE} has no 'sources' mapping")
        return {str(k): str(v) for k, v in sources.items()}

    def add_metric(
        self, name: str, values: ArrayLike, source: str | os.PathLike[str] | None = None
    ) -> None:
        """Store a per-latent metric beside the table (replacing one of the same name), so the
        browser can sort and filter by it."""
        self.add_columns(metrics={name: values}, source=source)

    def add_metrics(
        self, metrics: Mapping[str, ArrayLike], source: str | os.PathLike[str] | None = None
    ) -> None:
        """Store several metrics in one atomic write."""
        self.add_columns(metrics=metrics, source=source)

    def add_text(
        self,
        name: str,
        values: Sequence[str | None],
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        """Store a per-latent text column (None or empty: no value), so the browser can show,
        sort and filter by it."""
        self.add_columns(texts={name: values}, source=source)

    def add_texts(
        self,
        texts: Mapping[str, Sequence[str | None]],
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        """Store several text columns in one atomic write."""
        self.add_columns(texts=texts, source=source)

    def add_columns(
        self,
        metrics: Mapping[str, ArrayLike] | None = None,
        texts: Mapping[str, Sequence[str | None]] | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        """Store numeric and text columns together, replacing those of the same names: an
        evaluation's scores span both kinds, and a kill or a bad value must leave all of them
        or none. `source` is recorded for every column written; without one, a replaced
        column's old source is dropped (its values no longer come from there)."""
        metrics, texts = dict(metrics or {}), dict(texts or {})
        if not metrics and not texts:
            raise VisaeError("no columns to add (pass metrics or texts)")
        if source is not None and not str(source):
            raise VisaeError("the source of added columns is empty")
        old_metrics, old_texts, sources = self.metrics, self.texts, self.sources
        for name in metrics:
            _check_column_name("metric", name, old_texts, texts)
        for name in texts:
            _check_column_name("text column", name, old_metrics, metrics)
        new_metrics = {name: self._metric_values(name, v) for name, v in metrics.items()}
        new_texts = {name: self._text_values(name, v) for name, v in texts.items()}

        latent = np.arange(self.n_latents)
        files: dict[str, bytes] = {}
        if new_metrics:
            table = {"latent": latent, **old_metrics, **new_metrics}
            files[METRICS_FILE] = table_text(table).encode("utf-8")
        if new_texts:
            cells = {k: [x or "" for x in v] for k, v in {**old_texts, **new_texts}.items()}
            files[TEXTS_FILE] = table_text({"latent": latent, **cells}).encode("utf-8")
        added = [*new_metrics, *new_texts]
        kept = {k: v for k, v in sources.items() if k not in added}
        if source is not None:
            kept.update(dict.fromkeys(added, str(source)))
        if kept != sources:
            doc = json.dumps({"sources": kept}, indent=1, sort_keys=True)
            files[COLUMNS_FILE] = doc.encode("utf-8")
        self._commit(files)

    def _metric_values(self, name: str, values: ArrayLike) -> np.ndarray:
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise VisaeError(f"metric {name!r} has non-numeric values") from None
        if arr.shape != (self.n_latents,):
            raise VisaeError(f"metric {name!r} has shape {arr.shape}; expected ({self.n_latents},)")
        return arr

    def _text_values(self, name: str, values: Sequence[str | None]) -> list[str | None]:
        if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
            raise VisaeError(f"text column {name!r} is not a sequence of one value per latent")
        if len(values) != self.n_latents:
            raise VisaeError(
                f"text column {name!r} has {len(values)} values; expected {self.n_latents}"
            )
        out: list[str | None] = []
        for j, v in enumerate(values):
            if v is not None and not isinstance(v, str):
                raise VisaeError(
                    f"text column {name!r} has a {type(v).__name__} at latent {j} "
                    "(expected str or None)"
                )
            out.append(str(v) if v else None)
        return out

    def _extra_table(self, rel: str, kind: str) -> dict[str, np.ndarray]:
        text = self._extra_text(rel)
        if text is None:
            return {}
        cols = parse_table(text, self.path / rel, {"latent": "int"}, default=kind)
        if not np.array_equal(cols.get("latent", []), np.arange(self.n_latents)):
            raise VisaeError(f"{self.path / rel} does not list latents 0..{self.n_latents - 1}")
        return cols

    # --- atomic writes of the extra columns ---
    #
    # A write of several files commits at one rename: each file is written whole under a
    # pending name, then the journal (COMMIT_FILE) naming them appears, then each is renamed
    # into place and the journal removed. Readers take a listed pending copy over the file, so
    # from the journal's rename on they see the whole new version; before it, the old one. The
    # next write finishes the renames of a committed write and removes an uncommitted one.

    def _journal(self) -> list[str]:
        path = self.path / COMMIT_FILE
        try:
            text = _read_utf8(path)
        except FileNotFoundError:
            return []
        files = _json_key(text, path, "files")
        if not isinstance(files, list) or not set(files) <= set(EXTRA_FILES):
            raise VisaeError(f"{path} is not a column-write journal")
        return files

    def _extra_text(self, rel: str) -> str | None:
        """The current version of an extra-column file, None if there is none. A pending copy
        that a writer renames into place while this reads is found at its final name."""
        for _ in range(2):
            pending = self.path / _pending_name(rel)
            path = pending if rel in self._journal() and pending.is_file() else self.path / rel
            try:
                return _read_utf8(path)
            except FileNotFoundError:
                continue
        return None

    def _commit(self, files: dict[str, bytes]) -> None:
        self._finish_write()
        for rel, data in files.items():
            write_bytes(self.path / _pending_name(rel), data)
        write_text(self.path / COMMIT_FILE, json.dumps({"files": sorted(files)}))
        self._finish_write()

    def _finish_write(self) -> None:
        """Complete a committed write (rename its pending files into place), then remove what
        an uncommitted one left."""
        journal = self._journal()
        try:
            for rel in journal:
                pending = self.path / _pending_name(rel)
                if pending.is_file():
                    os.replace(pending, self.path / rel)
            if journal:
                fsync_dir(self.path)
                (self.path / COMMIT_FILE).unlink()
            for rel in EXTRA_FILES:
                pending = self.path / _pending_name(rel)
                pending.unlink(missing_ok=True)
                tmp_path(pending).unlink(missing_ok=True)
            tmp_path(self.path / COMMIT_FILE).unlink(missing_ok=True)
        except OSError as e:
            raise write_error(e, e.filename or self.path) from None

    # --- histograms ---

    @cached_property
    def hist(self) -> np.ndarray:
        """`[n_latents, n_bins]` counts of positive patch activations."""
        return self._npy(HIST_FILE)

    @property
    def hist_edges(self) -> np.ndarray:
        """The `n_bins + 1` bin edges of `hist`."""
        return HistogramSpec(**self.meta["histogram"]).edges()

    # --- top images ---

    def top_arrays(self, ranking: str) -> tuple[np.ndarray, np.ndarray]:
        """`(values [L, N], images [L, N])` of a ranking; empty slots have image -1."""
        self._check_ranking(ranking)
        return self._npy(top_file(ranking, "values")), self._npy(top_file(ranking, "images"))

    def top_maps(self, latent: int, ranking: str = "max") -> np.ndarray:
        """`[N, h, w]` float32 activation maps of the latent on its top images (rank order;
        zeros for empty slots)."""
        self._check_latent(latent)
        self._check_ranking(ranking)
        ptr = self._npy(top_file(ranking, "map_ptr"))
        patch = self._npy(top_file(ranking, "map_patch"))
        value = self._npy(top_file(ranking, "map_value"))
        h, w = self.grid
        n = self.top_n
        lo, hi = int(ptr[latent * n]), int(ptr[(latent + 1) * n])
        out = np.zeros((n, h * w), dtype=np.float32)
        slots = np.repeat(np.arange(n), np.diff(ptr[latent * n : (latent + 1) * n + 1]))
        out[slots, patch[lo:hi]] = value[lo:hi]
        return out.reshape(n, h, w)

    def top(self, latent: int, ranking: str = "max") -> list[TopEntry]:
        """The latent's top images under `ranking`, best first (only images where it fires)."""
        values, images = self.top_arrays(ranking)
        maps = self.top_maps(latent, ranking)
        return [
            TopEntry(int(images[latent, i]), float(values[latent, i]), maps[i])
            for i in range(images.shape[1])
            if images[latent, i] >= 0
        ]

    # --- per-image codes (image pages) ---

    @cached_property
    def code_images(self) -> np.ndarray:
        """Ids of the images whose per-patch codes are stored, ascending."""
        return self._npy(f"{CODES_DIR}/images.npy")

    def has_codes(self, image: int) -> bool:
        i = int(np.searchsorted(self.code_images, image))
        return i < len(self.code_images) and int(self.code_images[i]) == image

    def patch_codes(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """`(latents [h*w, K], values [h*w, K])` of one image: each patch's strongest latents,
        strongest first; unused slots have latent -1 and value 0."""
        row = self._code_row(image)
        lat = self._npy(f"{CODES_DIR}/latents.npy")
        val = self._npy(f"{CODES_DIR}/values.npy")
        return np.asarray(lat[row], dtype=np.int64), np.asarray(val[row], dtype=np.float32)

    def cls_codes(self, image: int) -> tuple[np.ndarray, np.ndarray] | None:
        """`(latents [K], values [K])` of the image's CLS token, or None without one."""
        if "cls" not in self.rankings:
            return None
        row = self._code_row(image)
        lat = self._npy(f"{CODES_DIR}/cls_latents.npy")
        val = self._npy(f"{CODES_DIR}/cls_values.npy")
        return np.asarray(lat[row], dtype=np.int64), np.asarray(val[row], dtype=np.float32)

    def latent_map(self, image: int, latent: int) -> np.ndarray:
        """The latent's activation on each patch of a stored image (`[h, w]`), from the
        per-patch codes: exact wherever the latent is among a patch's K strongest."""
        self._check_latent(latent)
        lat, val = self.patch_codes(image)
        h, w = self.grid
        return np.where(lat == latent, val, 0.0).sum(1).reshape(h, w).astype(np.float32)

    # --- images ---

    @cached_property
    def images(self) -> dict[int, dict[str, Any]]:
        """Per-image info for every image in the artifact: source, labels, thumbnail, sample."""
        path = self._file(IMAGES_FILE)
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise VisaeError(f"{path} is not readable JSON: {e}") from None
        return {int(r["image"]): r for r in rows}

    def thumbnail(self, image: int) -> Path:
        info = self.images.get(image)
        if info is None:
            raise VisaeError(f"image {image} is not in analysis {self.path}")
        return self.path / info["thumb"]

    @property
    def sample_images(self) -> list[int]:
        """The images picked for browsing independently of any latent."""
        return sorted(i for i, r in self.images.items() if r.get("sample"))

    # --- internals ---

    def _file(self, rel: str) -> Path:
        path = self.path / rel
        if not path.is_file():
            raise VisaeError(f"analysis {self.path} is missing {rel}")
        return path

    def _npy(self, rel: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_npy_cache", {})
        if rel not in cache:
            path = self._file(rel)
            try:
                cache[rel] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise VisaeError(f"{path} is not a readable .npy file: {e}") from None
        return cache[rel]

    def _check_ranking(self, ranking: str) -> None:
        if ranking not in self.rankings:
            raise VisaeError(
                f"analysis {self.path} has no ranking {ranking!r} (has {', '.join(self.rankings)})"
            )

    def _code_row(self, image: int) -> int:
        if not self.has_codes(image):
            raise VisaeError(f"analysis {self.path} has no per-patch codes for image {image}")
        return int(np.searchsorted(self.code_images, image))

    def _check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.n_latents:
            raise VisaeError(f"latent {latent} is out of range (0..{self.n_latents - 1})")


def _pending_name(rel: str) -> str:
    return f".{rel}{PENDING_SUFFIX}"


def _read_utf8(path: Path) -> str:
    """A file's text without newline translation (CSV cells may hold \\r\\n); a missing file
    raises FileNotFoundError, any other problem a VisaeError."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise VisaeError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise VisaeError(f"{path} is not UTF-8 text") from None


def _json_key(text: str, where: Path, key: str) -> Any:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise VisaeError(f"{where} is not readable JSON: {e}") from None
    return doc.get(key) if isinstance(doc, dict) else None


def _check_column_name(
    kind: str, name: str, other_kind: Mapping[str, Any], other_given: Mapping[str, Any]
) -> None:
    """Metric and text columns share one namespace with the base table: the browser sorts and
    filters by name."""
    if not isinstance(name, str) or not _METRIC_NAME.match(name) or name in dict(LATENT_COLUMNS):
        raise VisaeError(
            f"{kind} name {name!r} is not allowed (letters, digits, _.-; not a base column)"
        )
    if name in other_given:
        raise VisaeError(f"column {name!r} is given both as a metric and as a text column")
    if name in other_kind:
        other = "text column" if kind == "metric" else "metric"
        raise VisaeError(f"{kind} name {name!r} is already a {other} of this analysis")
