"""The evaluation report card: one self-contained HTML page over an evaluation folder.

`visae evaluate` writes `scores.json` (schema `visae.evaluation/1`) and per-latent CSV tables;
this module reads only those files, so a report can be rebuilt, or made on another machine,
without the SAE, the store or the evaluation code. The page shows every score beside its
sanity baselines (an untrained "frozen" SAE, random-activation codes, the layer's raw neurons)
and marks each score whose trained interval cannot be told from a baseline's, since such a
score says nothing about training (Klotz et al.: MS does not separate, matching does).
Plots are PNG files in `DIR/plots/`, referenced relatively, so the folder opens from file://
and from a copy anywhere.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from visae.atomic import atomic_directory, write_text
from visae.errors import VisaeError
from visae.eval.config import LATENT_COLUMNS, NEURON_COLUMNS, SCHEMA

SCORES_FILE = "scores.json"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
RAW_NEURONS_FILE = "raw_neurons.csv"
MS_SCORE = "ms"
"""The score whose `chance` is the MS chance level drawn on the MS histogram."""

VARIANTS = ("trained", "frozen", "random", "raw_neurons")
BASELINES = VARIANTS[1:]
LABELS = {
    "trained": "trained",
    "frozen": "frozen SAE",
    "random": "random codes",
    "raw_neurons": "raw neurons",
}
COLORS = {"trained": "#3b6ea8", "frozen": "#d08a2e", "random": "#8a8a8a", "raw_neurons": "#4f9d5d"}
_TEXT_COLUMNS = ("concept", "coarse", "fine")
MAX_CONCEPT_ROWS = 40
"""TAPA plot rows; beyond it the plot shows the highest and lowest half each (the table below
it lists every concept)."""

# what each section of `inputs` and `settings` must hold: key -> kind ("?" allows null)
_INPUTS: dict[str, tuple[bool, dict[str, str]]] = {
    "sae": (
        False,
        {
            "path": "str",
            "arch": "str",
            "n_latents": "int",
            "k": "int?",
            "d": "int",
            "tokens": "str",
            "layer": "int",
            "matryoshka": "[num]?",
        },
    ),
    "store": (
        False,
        {
            "path": "str",
            "backbone": "str",
            "dataset": "str",
            "fingerprint": "str",
            "n_images": "int",
        },
    ),
    "images": (False, {"n": "int", "rule": "str"}),
    "concepts": (False, {"source": "str", "n_scored": "int", "excluded": "[str]"}),
    "pairs": (True, {"source": "str", "n_pairs": "int", "dropped": "[str]"}),
    "encoder": (True, {"name": "str", "weights_hash": "str", "embedding": "str"}),
    "taxonomy": (True, {"source": "str", "n_with_path": "int"}),
}
_SETTINGS = {
    "variants": "[str]",
    "n_resamples": "int",
    "level": "num",
    "seed": "int",
    "k": "[int]",
    "image_codes": "str",
    "top_images": "int",
}


@dataclass(frozen=True)
class Value:
    """One variant's score: `value` None where undefined (e.g. no live latent)."""

    value: float | None
    ci: tuple[float, float] | None
    n: int


@dataclass(frozen=True)
class Score:
    name: str
    title: str
    group: str
    level: str
    over: str
    chance: float | None
    values: dict[str, Value]
    separates: dict[str, bool | None]
    note: str | None

    def indistinct(self) -> list[str]:
        """Baselines the trained interval cannot be told from (`separates` false)."""
        return [b for b in BASELINES if self.separates.get(b) is False]


@dataclass(frozen=True)
class Curve:
    """MATCHScore@k at one level: per variant one value (or None) per k."""

    k: list[int]
    values: dict[str, list[float | None]]


@dataclass(frozen=True)
class TapaConcept:
    concept: str
    n_swap_add: int
    swap_add: dict[str, float | None]
    n_removal: int
    removal: dict[str, float | None]


@dataclass(frozen=True)
class HierarchyGroup:
    group: int
    start: int
    stop: int
    values: dict[str, Value]


@dataclass(frozen=True)
class ScoreCard:
    """What `scores.json` holds, validated against schema visae.evaluation/1."""

    path: Path
    visae_version: str
    inputs: dict[str, Any]
    settings: dict[str, Any]
    scores: list[Score]
    curves: dict[str, Curve]
    tapa: list[TapaConcept]
    hierarchy: list[HierarchyGroup]
    timings: dict[str, float]

    @property
    def variants(self) -> list[str]:
        return list(self.settings["variants"])


@dataclass(frozen=True)
class Table:
    """One per-latent (or per-neuron) CSV: numeric columns as float64 with NaN where the cell is
    empty (undefined), text columns as strings."""

    path: Path
    numbers: dict[str, np.ndarray]
    text: dict[str, list[str]]

    def live(self, column: str) -> np.ndarray:
        """The column's defined values, dead latents left out."""
        x = self.numbers[column]
        keep = np.isfinite(x)
        if "dead" in self.numbers:
            keep &= self.numbers["dead"] == 0
        return x[keep]


# -- reading ------------------------------------------------------------------------------


def load_score_card(eval_dir: str | os.PathLike[str]) -> ScoreCard:
    """Read and validate `eval_dir/scores.json`; a missing file, another schema or a field
    off the schema is one VisaeError naming the field."""
    root = Path(eval_dir)
    path = root / SCORES_FILE
    if not path.is_file():
        raise VisaeError(f"{root} is not an evaluation folder: it has no {SCORES_FILE}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError) as e:
        raise VisaeError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise VisaeError(f"{path} is not JSON: {e}") from None
    except ValueError as e:
        raise VisaeError(f"{path}: {e}") from None
    if not isinstance(doc, dict):
        raise VisaeError(f"{path} does not hold a JSON object")
    if doc.get("schema") != SCHEMA:
        raise VisaeError(f"{path} has schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return _Reader(path).evaluation(root, doc)


def _show(x: Any) -> str:
    """A value quoted in an error, cut so the message stays short."""
    text = json.dumps(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed (an undefined value is written as null)")


class _Reader:
    """Validation of one scores.json; every error names the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> VisaeError:
        return VisaeError(f"{self.path}: {where} {what}")

    def field(self, obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where or "the document", "must be an object")
        if key not in obj:
            raise self.fail(f"{where}.{key}" if where else key, "is missing")
        return obj[key]

    def kind(self, x: Any, kind: str, where: str) -> Any:
        if kind.endswith("?"):
            return None if x is None else self.kind(x, kind[:-1], where)
        if kind.startswith("["):
            if not isinstance(x, list):
                raise self.fail(where, f"must be a list, got {_show(x)}")
            return [self.kind(v, kind[1:-1], f"{where}[{i}]") for i, v in enumerate(x)]
        if kind == "str" and isinstance(x, str):
            return x
        if kind == "bool" and isinstance(x, bool):
            return x
        if kind == "int" and isinstance(x, int) and not isinstance(x, bool):
            return x
        if kind == "num" and isinstance(x, int | float) and not isinstance(x, bool):
            return float(x)
        names = {"str": "a string", "bool": "true or false", "int": "an integer", "num": "a number"}
        raise self.fail(where, f"must be {names[kind]}, got {_show(x)}")

    def section(self, obj: Any, spec: dict[str, str], where: str) -> dict[str, Any]:
        out = dict(self.obj(obj, where))
        for key, kind in spec.items():
            out[key] = self.kind(self.field(obj, key, where), kind, f"{where}.{key}")
        return out

    def obj(self, x: Any, where: str) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise self.fail(where, f"must be an object, got {_show(x)}")
        return x

    def variant(self, key: str, where: str, allowed: tuple[str, ...] = VARIANTS) -> str:
        if key not in allowed:
            raise self.fail(
                where, f"names an unknown variant {key!r} (known: {', '.join(allowed)})"
            )
        return key

    def value(self, x: Any, where: str) -> Value:
        value = self.kind(self.field(x, "value", where), "num?", f"{where}.value")
        ci = self.kind(self.field(x, "ci", where), "[num]?", f"{where}.ci")
        if ci is not None and (len(ci) != 2 or ci[0] > ci[1]):
            raise self.fail(f"{where}.ci", f"must be [lo, hi] with lo <= hi, got {ci!r}")
        n = self.kind(self.field(x, "n", where), "int", f"{where}.n")
        if n < 0:
            raise self.fail(f"{where}.n", f"must be >= 0, got {n}")
        return Value(value, None if ci is None else (ci[0], ci[1]), n)

    def values(self, x: Any, where: str) -> dict[str, Value]:
        return {
            self.variant(v, f"{where}.{v}"): self.value(val, f"{where}.{v}")
            for v, val in self.obj(x, where).items()
        }

    def score(self, x: Any, where: str) -> Score:
        text = {
            key: self.kind(self.field(x, key, where), "str", f"{where}.{key}")
            for key in ("name", "title", "group", "level", "over")
        }
        for key, allowed in (
            ("level", ("image", "patch")),
            ("over", ("concepts", "latents", "pairs")),
        ):
            if text[key] not in allowed:
                raise self.fail(f"{where}.{key}", f"must be one of {', '.join(allowed)}")
        separates = {
            self.variant(b, f"{where}.separates.{b}", BASELINES): self.kind(
                s, "bool?", f"{where}.separates.{b}"
            )
            for b, s in self.obj(self.field(x, "separates", where), f"{where}.separates").items()
        }
        return Score(
            chance=self.kind(self.field(x, "chance", where), "num?", f"{where}.chance"),
            values=self.values(self.field(x, "values", where), f"{where}.values"),
            separates=separates,
            note=self.kind(self.field(x, "note", where), "str?", f"{where}.note"),
            **text,
        )

    def curve(self, x: Any, where: str) -> Curve:
        k = self.kind(self.field(x, "k", where), "[int]", f"{where}.k")
        values: dict[str, list[float | None]] = {}
        for key, ys in self.obj(x, where).items():
            if key == "k":
                continue
            ys = self.kind(ys, "[num?]", f"{where}.{self.variant(key, f'{where}.{key}')}")
            if len(ys) != len(k):
                raise self.fail(f"{where}.{key}", f"has {len(ys)} values for {len(k)} k")
            values[key] = ys
        return Curve(k, values)

    def scalars(self, x: Any, where: str) -> dict[str, float | None]:
        return {
            self.variant(v, f"{where}.{v}"): self.kind(val, "num?", f"{where}.{v}")
            for v, val in self.obj(x, where).items()
        }

    def tapa(self, x: Any, where: str) -> TapaConcept:
        return TapaConcept(
            concept=self.kind(self.field(x, "concept", where), "str", f"{where}.concept"),
            n_swap_add=self.kind(self.field(x, "n_swap_add", where), "int", f"{where}.n_swap_add"),
            swap_add=self.scalars(self.field(x, "swap_add", where), f"{where}.swap_add"),
            n_removal=self.kind(self.field(x, "n_removal", where), "int", f"{where}.n_removal"),
            removal=self.scalars(self.field(x, "removal", where), f"{where}.removal"),
        )

    def group(self, x: Any, where: str) -> HierarchyGroup:
        ints = {
            key: self.kind(self.field(x, key, where), "int", f"{where}.{key}")
            for key in ("group", "start", "stop")
        }
        values = {}
        for v, val in self.obj(x, where).items():
            if v not in ints:
                values[self.variant(v, f"{where}.{v}")] = self.value(val, f"{where}.{v}")
        return HierarchyGroup(values=values, **ints)

    def evaluation(self, root: Path, doc: dict[str, Any]) -> ScoreCard:
        version = self.kind(self.field(doc, "visae_version", ""), "str", "visae_version")
        raw_inputs = self.obj(self.field(doc, "inputs", ""), "inputs")
        inputs: dict[str, Any] = {}
        for name, (nullable, spec) in _INPUTS.items():
            section = self.field(raw_inputs, name, "inputs")
            if section is None and nullable:
                inputs[name] = None
            else:
                inputs[name] = self.section(section, spec, f"inputs.{name}")
        settings = self.section(self.field(doc, "settings", ""), _SETTINGS, "settings")
        for i, v in enumerate(settings["variants"]):
            self.variant(v, f"settings.variants[{i}]", VARIANTS[:3])
        if not 0 < settings["level"] < 1:
            raise self.fail("settings.level", f"must lie in (0, 1), got {settings['level']}")
        if "trained" not in settings["variants"]:
            raise self.fail("settings.variants", "must include 'trained'")
        scores_doc = self.field(doc, "scores", "")
        if not isinstance(scores_doc, list):
            raise self.fail("scores", "must be a list")
        scores = [self.score(s, f"scores[{i}]") for i, s in enumerate(scores_doc)]
        seen: set[str] = set()
        for i, s in enumerate(scores):
            if s.name in seen:
                raise self.fail(f"scores[{i}].name", f"repeats {s.name!r}")
            seen.add(s.name)
        curves_doc = self.obj(doc.get("curves") or {}, "curves")
        match_doc = self.obj(curves_doc.get("match_at_k") or {}, "curves.match_at_k")
        curves = {}
        for level, c in match_doc.items():
            if level not in ("image", "patch"):
                raise self.fail(f"curves.match_at_k.{level}", "is not a level (image, patch)")
            curves[level] = self.curve(c, f"curves.match_at_k.{level}")
        tapa_doc = doc.get("tapa_per_concept") or []
        groups_doc = doc.get("hierarchy_groups") or []
        for key, x in (("tapa_per_concept", tapa_doc), ("hierarchy_groups", groups_doc)):
            if not isinstance(x, list):
                raise self.fail(key, "must be a list")
        timings = {
            stage: self.kind(t, "num", f"timings.{stage}")
            for stage, t in self.obj(self.field(doc, "timings", ""), "timings").items()
        }
        return ScoreCard(
            path=root,
            visae_version=version,
            inputs=inputs,
            settings=settings,
            scores=scores,
            curves=curves,
            tapa=[self.tapa(x, f"tapa_per_concept[{i}]") for i, x in enumerate(tapa_doc)],
            hierarchy=[self.group(x, f"hierarchy_groups[{i}]") for i, x in enumerate(groups_doc)],
            timings=timings,
        )


def latents_file(variant: str) -> str:
    return f"latents_{variant}.csv"


def read_tables(ev: ScoreCard) -> dict[str, Table]:
    """The per-latent table of every variant the evaluation ran (each one must be there: a
    missing one is a partial folder), and the raw-neuron table where it exists."""
    n_latents = ev.inputs["sae"]["n_latents"]
    tables = {}
    for v in ev.variants:
        path = ev.path / latents_file(v)
        if not path.is_file():
            raise VisaeError(f"{ev.path} lacks {path.name}, though settings.variants lists {v!r}")
        tables[v] = read_table(path, LATENT_COLUMNS, n_latents, "inputs.sae.n_latents")
    path = ev.path / RAW_NEURONS_FILE
    if path.is_file():
        tables["raw_neurons"] = read_table(
            path, NEURON_COLUMNS, ev.inputs["sae"]["d"], "inputs.sae.d"
        )
    return tables


def read_table(path: Path, columns: tuple[str, ...], rows: int, rows_from: str) -> Table:
    """Read a per-latent CSV: its first column numbers the rows 0..rows-1, an empty cell is
    undefined (NaN), any other cell of a numeric column must be a finite number."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            body = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VisaeError(f"cannot read {path}: {e}") from None
    if not body:
        raise VisaeError(f"{path} is empty (no header)")
    header, body = body[0], body[1:]
    missing = [c for c in columns if c not in header]
    if missing:
        raise VisaeError(f"{path} lacks column(s) {', '.join(missing)}")
    if len(body) != rows:
        raise VisaeError(f"{path} has {len(body)} rows, expected {rows} ({rows_from})")
    for line, row in enumerate(body, 2):
        if len(row) != len(header):
            raise VisaeError(f"{path}:{line} has {len(row)} cells, the header {len(header)}")
    numbers: dict[str, np.ndarray] = {}
    text: dict[str, list[str]] = {}
    for c in columns:
        cells = [row[header.index(c)] for row in body]
        if c in _TEXT_COLUMNS:
            text[c] = cells
        else:
            numbers[c] = np.array([_cell(path, line, c, x) for line, x in enumerate(cells, 2)])
    ids = numbers[columns[0]]
    if not np.array_equal(ids, np.arange(rows)):
        raise VisaeError(f"{path}: column {columns[0]} must number the rows 0..{rows - 1}")
    if "dead" in numbers and not np.isin(numbers["dead"], (0, 1)).all():
        raise VisaeError(f"{path}: column dead must be 0 or 1 on every row")
    return Table(path, numbers, text)


def _cell(path: Path, line: int, column: str, cell: str) -> float:
    if cell == "":
        return math.nan
    try:
        x = float(cell)
    except ValueError:
        raise VisaeError(f"{path}:{line}: {column} {cell!r} is not a number") from None
    if not math.isfinite(x):
        raise VisaeError(f"{path}:{line}: {column} is {cell!r}; an undefined cell is left empty")
    return x


# -- formatting ---------------------------------------------------------------------------


def fmt(x: float) -> str:
    """Three decimals, or three significant digits for small magnitudes (a dead fraction of
    0.0004 must not read as 0)."""
    text = f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2e}"
    return "0.000" if text == "-0.000" else text


def format_value(v: Value | None, ci: bool = True) -> str:
    """'0.412 [0.390, 0.431]'; 'undefined' for a null value; '-' where the variant (or the
    score) is absent."""
    if v is None:
        return "-"
    if v.value is None:
        return "undefined"
    text = fmt(v.value)
    if ci and v.ci is not None:
        text += f" [{fmt(v.ci[0])}, {fmt(v.ci[1])}]"
    return text


def verdict(score: Score) -> str:
    """'undefined', 'indistinct' (cannot be told from some baseline), 'separates' (from every
    baseline tested) or 'untested' (no baseline with an interval)."""
    trained = score.values.get("trained")
    if trained is None or trained.value is None:
        return "undefined"
    if score.indistinct():
        return "indistinct"
    if any(score.separates.get(b) for b in BASELINES):
        return "separates"
    return "untested"


def short_name(ev: ScoreCard) -> str:
    """The SAE as visae names its training runs: arch, Matryoshka, size, k."""
    sae = ev.inputs["sae"]
    parts = [sae["arch"]]
    if sae["matryoshka"]:
        parts.append("matryoshka")
    parts.append(f"n{sae['n_latents']}")
    if sae["k"] is not None:
        parts.append(f"k{sae['k']}")
    return "-".join(parts)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def mpl_text(text: str) -> str:
    """Text matplotlib draws literally ('$' would start mathtext)."""
    return text.replace("$", r"\$")


# -- plots ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    file: str
    """Relative to the evaluation folder."""
    caption: str


def _histograms(
    tables: dict[str, Table],
    column: str,
    xlabel: str,
    path: Path,
    chance: float | None = None,
) -> dict[str, int]:
    """Overlaid histograms of a column's live values, one per variant on shared bins, each
    normalised to its own count (variants differ in size: d raw neurons vs n_latents); the
    count drawn per variant, nothing drawn (empty) where no variant has a live value."""
    data = {
        v: tables[v].live(column) for v in VARIANTS if v in tables and column in tables[v].numbers
    }
    data = {v: x for v, x in data.items() if x.size}
    if not data:
        return {}
    lo = min(float(x.min()) for x in data.values())
    hi = max(float(x.max()) for x in data.values())
    if chance is not None:
        lo, hi = min(lo, chance), max(hi, chance)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    for v, x in data.items():
        style = {"alpha": 0.35} if v == "trained" else {"histtype": "step", "linewidth": 1.6}
        ax.hist(
            x,
            bins=bins,
            weights=np.full(x.size, 1.0 / x.size),
            color=COLORS[v],
            label=f"{LABELS[v]} ({x.size})",
            **style,
        )
    if chance is not None:
        ax.axvline(chance, color="k", linestyle="--", linewidth=1, label=f"chance {fmt(chance)}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of live latents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return {v: int(x.size) for v, x in data.items()}


def _save(fig: plt.Figure, path: Path, top: float = 1.0) -> None:
    """`top`: the fraction of the height left to the axes (a figure legend takes the rest)."""
    try:
        fig.tight_layout(rect=(0, 0, 1, top))
        fig.savefig(path)
    finally:
        plt.close(fig)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{LABELS[v]} {n}" for v, n in counts.items())


def _plot_ms(ev: ScoreCard, tables: dict[str, Table], folder: Path) -> Plot | None:
    chance = next((s.chance for s in ev.scores if s.name == MS_SCORE), None)
    counts = _histograms(tables, "ms", "Monosemanticity Score", folder / "ms.png", chance)
    if not counts:
        return None
    caption = (
        f"Monosemanticity Score of each live latent ({_counts(counts)}; dead and undefined ones "
        "left out). A trained SAE's latents should lie to the right of its baselines'."
    )
    if chance is None:
        caption += f" No chance level: scores.json has no score {MS_SCORE!r} with one."
    else:
        caption += (
            f" The dashed line is the chance level {fmt(chance)}: the expected score of a latent "
            "that fires on random images."
        )
    return Plot(f"{PLOTS_DIR}/ms.png", caption)


def _plot_locality(tables: dict[str, Table], folder: Path) -> Plot | None:
    counts = _histograms(
        tables, "locality", "locality of the activation maps", folder / "locality.png"
    )
    if not counts:
        return None
    return Plot(
        f"{PLOTS_DIR}/locality.png",
        f"Locality of each live latent's activation maps ({_counts(counts)}; dead and undefined "
        "ones left out): human interpretability tracks it (Colin et al.).",
    )


_K_TICKS = {1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000}
"""k labelled on a MATCH@k axis of many k."""


def _plot_match(ev: ScoreCard, folder: Path) -> Plot | None:
    levels = [lv for lv in ("image", "patch") if lv in ev.curves]
    if not levels:
        return None
    fig, axes = plt.subplots(
        1, len(levels), figsize=(4.4 * len(levels), 3.4), dpi=100, squeeze=False
    )
    for ax, level in zip(axes[0], levels, strict=True):
        curve = ev.curves[level]
        for v in VARIANTS:
            if v in curve.values:
                ys = [math.nan if y is None else y for y in curve.values[v]]
                ax.plot(
                    curve.k,
                    ys,
                    marker="o",
                    markersize=3 if len(curve.k) > 8 else 6,
                    color=COLORS[v],
                    label=LABELS[v],
                )
        ticks = [k for k in curve.k if len(curve.k) <= 8 or k in _K_TICKS or k == curve.k[-1]]
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k (latents per concept, at most)")
        ax.set_ylabel("MATCHScore@k")
        ax.set_title(f"{level} level", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    _save(fig, folder / "match_at_k.png", top=0.9)
    return Plot(
        f"{PLOTS_DIR}/match_at_k.png",
        f"MATCHScore@k at the {' and '.join(levels)} level: the mean over concepts of the best F1 "
        "that matching pursuit (FBMP) reaches with at most k latents. The baselines show what "
        "matching finds in codes that learned nothing.",
    )


_PAIR_KINDS = (
    ("swap_add", "n_swap_add", "swap/add pairs", (-2.0, 2.0)),
    ("removal", "n_removal", "removal pairs", (-1.0, 1.0)),
)


def _tapa_rows(ev: ScoreCard) -> list[TapaConcept]:
    return [c for c in ev.tapa if c.n_swap_add + c.n_removal > 0]


def _plot_tapa(ev: ScoreCard, folder: Path) -> Plot | None:
    rows = _tapa_rows(ev)
    panels = []
    shown_note = ""
    for attr, n_attr, label, xlim in _PAIR_KINDS:
        have = [c for c in rows if getattr(c, n_attr) > 0]
        if not have:
            continue
        defined = [c for c in have if getattr(c, attr).get("trained") is not None]
        order = sorted(defined, key=lambda c: -getattr(c, attr)["trained"])
        order += [c for c in have if getattr(c, attr).get("trained") is None]
        if len(order) > MAX_CONCEPT_ROWS:
            half = MAX_CONCEPT_ROWS // 2
            order = sorted(defined, key=lambda c: -getattr(c, attr)["trained"])
            order = order[:half] + order[-half:]
            shown_note += (
                f" The {label} panel shows the {half} highest and {half} lowest trained scores of "
                f"{len(have)} concepts; the table below lists all."
            )
        panels.append((attr, label, xlim, order))
    if not panels:
        return None
    n_rows = max(len(p[3]) for p in panels)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 1.3 + 0.32 * n_rows), dpi=100, squeeze=False
    )
    for ax, (attr, label, xlim, order) in zip(axes[0], panels, strict=True):
        variants = [v for v in VARIANTS if any(v in getattr(c, attr) for c in order)]
        height = 0.8 / len(variants)
        y = np.arange(len(order))
        for i, v in enumerate(variants):
            xs = [getattr(c, attr).get(v) for c in order]
            xs = [math.nan if x is None else x for x in xs]
            ax.barh(
                y - 0.4 + (i + 0.5) * height, xs, height=height, color=COLORS[v], label=LABELS[v]
            )
        ax.set_yticks(y, [mpl_text(c.concept) for c in order], fontsize=7)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set_xlim(xlim[0] * 1.03, xlim[1] * 1.03)
        ax.axvline(0, color="k", linewidth=0.8)
        ax.set_xlabel(f"TAPAScore ({label})")
        ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    _save(fig, folder / "tapa.png", top=1 - 0.35 / (1.3 + 0.32 * n_rows))
    return Plot(
        f"{PLOTS_DIR}/tapa.png",
        f"TAPAScore per concept with pairs ({len(rows)} of {len(ev.tapa)} concepts), trained vs "
        "baselines: does the concept's matched coalition of latents turn on and off with the "
        "edited attribute? Swap/add pairs range over [-2, 2], removal pairs over [-1, 1]; 0 is "
        "no alignment." + shown_note,
    )


def _plot_hierarchy(ev: ScoreCard, folder: Path) -> Plot | None:
    groups = ev.hierarchy
    variants = [
        v for v in VARIANTS if any(v in g.values and g.values[v].value is not None for g in groups)
    ]
    if not variants:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    width = 0.7 / len(variants)
    for i, v in enumerate(variants):
        x, y, lo, hi = [], [], [], []
        for n, g in enumerate(groups):
            val = g.values.get(v)
            if val is None or val.value is None:
                continue
            x.append(n - 0.35 + (i + 0.5) * width)
            y.append(val.value)
            ci = val.ci or (val.value, val.value)
            lo.append(ci[0])
            hi.append(ci[1])
        ax.vlines(x, lo, hi, color=COLORS[v], linewidth=1.5)
        ax.scatter(x, y, color=COLORS[v], zorder=3, label=LABELS[v])
    ax.set_xticks(
        range(len(groups)), [f"{g.group}\n{g.start}-{g.stop}" for g in groups], fontsize=8
    )
    ax.set_xlabel("Matryoshka group (latents start-stop)")
    ax.set_ylabel("mean LCA depth of top images")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    _save(fig, folder / "hierarchy.png")
    level = f"{ev.settings['level']:.0%}"
    return Plot(
        f"{PLOTS_DIR}/hierarchy.png",
        f"Mean depth of the lowest common ancestor, in the taxonomy, of each latent's top images, "
        f"per Matryoshka group, with {level} intervals: early (coarse) groups should share "
        "shallower ancestors than late (fine) ones.",
    )


def _plots(ev: ScoreCard, tables: dict[str, Table], folder: Path) -> list[Plot]:
    made = [
        _plot_ms(ev, tables, folder),
        _plot_match(ev, folder),
        _plot_tapa(ev, folder),
        _plot_hierarchy(ev, folder),
        _plot_locality(tables, folder),
    ]
    return [p for p in made if p is not None]


# -- the page -------------------------------------------------------------------------------


def write_report(eval_dir: str | os.PathLike[str]) -> Path:
    """Write `eval_dir/report.html` and its plots (`eval_dir/plots/`, replaced whole, so no
    plot of an earlier report survives) from the folder's scores.json and CSV tables."""
    ev = load_score_card(eval_dir)
    tables = read_tables(ev)
    with atomic_directory(ev.path / PLOTS_DIR) as tmp:
        plots = _plots(ev, tables, tmp)
    out = ev.path / REPORT_FILE
    write_text(out, _page(ev, plots))
    return out


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #eee; text-align: left;
         vertical-align: top; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.group th { background: #f3f3f3; font-weight: 600; }
.n, .meta { color: #777; font-size: 0.85em; display: block; }
.note { color: #555; font-style: italic; font-size: 0.9em; }
td.same { background: #fff0d9; }
.indistinct-mark { color: #a04d00; font-weight: 600; }
.separate-mark { color: #2d6a2d; }
.untested-mark, .undefined { color: #888; }
td.verdict span { white-space: nowrap; }
.kv b { font-weight: 600; }
.kv span { margin-right: 1.2em; white-space: nowrap; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; max-width: 800px; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""


def _page(ev: ScoreCard, plots: list[Plot]) -> str:
    sae, store = ev.inputs["sae"], ev.inputs["store"]
    k = f", k = {sae['k']}" if sae["k"] is not None else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>visae evaluation: {_e(short_name(ev))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Evaluation of {_e(sae['path'])}</h1>",
        f'<p class="meta">{_e(sae["arch"])} SAE, {sae["n_latents"]} latents{_e(k)}, on '
        f"{_e(sae['tokens'])} tokens of layer {sae['layer']} of {_e(store['backbone'])}; "
        f"{ev.inputs['images']['n']} images of {_e(store['dataset'])}</p>",
        f'<p id="summary">{_e(_summary(ev))}</p>',
        '<h2>Inputs</h2><table class="kv" id="inputs">',
        *(_kv_row(name, section) for name, section in ev.inputs.items()),
        '</table><h2>Settings</h2><table class="kv" id="settings">',
        _kv_row("settings", ev.settings),
        "</table>",
        _scores_table(ev),
        "<h2>Plots</h2>",
    ]
    if not plots:
        parts.append("<p>No plot: this evaluation holds no data to draw.</p>")
    for p in plots:
        parts.append(
            f'<figure><img src="{_e(p.file)}" alt="{_e(Path(p.file).stem)} plot">'
            f"<figcaption>{_e(p.caption)}</figcaption></figure>"
        )
    parts.append(_tapa_table(ev))
    parts.append(_timings(ev))
    parts.append(
        f"<footer>Made by visae from {SCORES_FILE} (schema {_e(SCHEMA)}), written by visae "
        f"{_e(ev.visae_version)}.</footer></body></html>\n"
    )
    return "\n".join(p for p in parts if p)


def _summary(ev: ScoreCard) -> str:
    counts = {key: 0 for key in ("separates", "indistinct", "undefined", "untested")}
    for s in ev.scores:
        counts[verdict(s)] += 1
    phrases = {
        "separates": "separate the trained SAE from every baseline tested",
        "indistinct": "cannot be told from a baseline",
        "undefined": "are undefined",
        "untested": "have no interval against a baseline",
    }
    said = [f"{n} {phrases[key]}" for key, n in counts.items() if n]
    return f"{len(ev.scores)} scores" + (": " + "; ".join(said) if said else "") + "."


def _kv_value(x: Any) -> str:
    if x is None:
        return "none"
    if isinstance(x, list):
        if not x:
            return "none"
        text = _e(", ".join(str(v) for v in x))
        if len(x) <= 8:
            return text
        return f"<details><summary>{len(x)} items</summary>{text}</details>"
    if isinstance(x, float):
        return _e(repr(x))
    return _e(x)


def _kv_row(name: str, section: dict[str, Any] | None) -> str:
    if section is None:
        return f"<tr><th>{_e(name)}</th><td>none</td></tr>"
    cells = "".join(f"<span><b>{_e(k)}</b> {_kv_value(v)}</span> " for k, v in section.items())
    return f"<tr><th>{_e(name)}</th><td>{cells}</td></tr>"


def _scores_table(ev: ScoreCard) -> str:
    columns = [v for v in VARIANTS if v == "trained" or any(v in s.values for s in ev.scores)]
    level = f"{ev.settings['level']:.0%}"
    head = "".join(f"<th>{_e(LABELS[v])}</th>" for v in columns)
    rows = [
        "<h2>Scores</h2>",
        f"<p>Each cell: value [{level} bootstrap interval] over n items. A score separates the "
        "trained SAE from a baseline when the interval of (trained - baseline) excludes 0; a row "
        "marked &#9888; does not, so that score does not tell this SAE's training apart from the "
        "baseline. An undefined value (e.g. no live latent) is shown as such, with its note.</p>",
        f'<table id="scores"><tr><th>score</th><th>chance</th>{head}<th>verdict</th></tr>',
    ]
    group = None
    for s in ev.scores:
        if s.group != group:
            group = s.group
            rows.append(f'<tr class="group"><th colspan="{len(columns) + 3}">{_e(group)}</th></tr>')
        rows.append(_score_row(s, columns))
    rows.append("</table>")
    return "\n".join(rows)


def _score_row(s: Score, columns: list[str]) -> str:
    note = f'<span class="note">{_e(s.note)}</span>' if s.note else ""
    cells = [
        f'<td><b>{_e(s.title)}</b><span class="meta">{_e(s.name)} &middot; {_e(s.level)} '
        f"level, over {_e(s.over)}</span>{note}</td>",
        f'<td class="num">{"-" if s.chance is None else fmt(s.chance)}</td>',
    ]
    same = s.indistinct()
    for v in columns:
        val = s.values.get(v)
        text = format_value(val)
        css = "num" + (" same" if v in same else "") + (" undefined" if text == "undefined" else "")
        n = f'<span class="n">n = {val.n}</span>' if val is not None else ""
        cells.append(f'<td class="{css}">{_e(text)}{n}</td>')
    cells.append(f'<td class="verdict">{_verdict_cell(s)}</td>')
    css = f"score {verdict(s)}"
    return f'<tr class="{css}" data-score="{_e(s.name)}">{"".join(cells)}</tr>'


def _verdict_cell(s: Score) -> str:
    if verdict(s) == "undefined":
        return '<span class="undefined">undefined</span>'
    said = []
    for b in BASELINES:
        sep = s.separates.get(b)
        if sep is True:
            said.append(f'<span class="separate-mark">separates from {_e(LABELS[b])}</span>')
        elif sep is False:
            said.append(
                f'<span class="indistinct-mark">&#9888; not distinguishable from '
                f"{_e(LABELS[b])}</span>"
            )
        elif b in s.separates and b in s.values:
            why = "no test: {} undefined" if s.values[b].value is None else "no interval against {}"
            said.append(f'<span class="untested-mark">{_e(why.format(LABELS[b]))}</span>')
    return "<br>".join(said) if said else '<span class="untested-mark">no baseline</span>'


def _tapa_table(ev: ScoreCard) -> str:
    rows = _tapa_rows(ev)
    if not rows:
        return ""
    kinds = [k for k in _PAIR_KINDS if any(getattr(c, k[1]) > 0 for c in rows)]
    variants = [v for v in VARIANTS if any(v in getattr(c, k[0]) for c in rows for k in kinds)]
    head = "".join(
        f"<th>{_e(label)}</th>" + "".join(f"<th>{_e(LABELS[v])}</th>" for v in variants)
        for _, _, label, _ in kinds
    )
    out = [
        f"<details><summary>TAPAScore of each of the {len(rows)} concepts with pairs</summary>",
        f'<table id="tapa"><tr><th>concept</th>{head}</tr>',
    ]
    for c in rows:
        cells = [f"<td>{_e(c.concept)}</td>"]
        for attr, n_attr, _, _ in kinds:
            cells.append(f'<td class="num">{getattr(c, n_attr)}</td>')
            for v in variants:
                x = getattr(c, attr).get(v)
                text = "-" if v not in getattr(c, attr) else "undefined" if x is None else fmt(x)
                cells.append(f'<td class="num">{text}</td>')
        out.append(f"<tr>{''.join(cells)}</tr>")
    out.append("</table></details>")
    return "\n".join(out)


def _timings(ev: ScoreCard) -> str:
    if not ev.timings:
        return ""
    rows = "".join(
        f'<tr><td>{_e(stage)}</td><td class="num">{t:.1f} s</td></tr>'
        for stage, t in ev.timings.items()
    )
    total = sum(ev.timings.values())
    return (
        f'<h2>Timings</h2><table id="timings">{rows}'
        f'<tr><th>total</th><td class="num">{total:.1f} s</td></tr></table>'
    )
