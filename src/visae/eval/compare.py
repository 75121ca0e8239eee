"""Several evaluations side by side (a dictionary-size sweep, two models): one table of every
score in any of them, each evaluation's trained value with its interval beside its baselines,
as text (what `visae compare` prints), CSV and one PNG.

Only the evaluations' `scores.json` files are read. Evaluations of different stores, concept
sources or settings may be compared, since that is sometimes the point, but the table says
which inputs differ, so such a comparison is never mistaken for a like-for-like one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from visae.atomic import write_bytes, write_text
from visae.errors import VisaeError
from visae.eval.report import (
    BASELINES,
    COLORS,
    LABELS,
    VARIANTS,
    Score,
    ScoreCard,
    format_value,
    load_score_card,
    mpl_text,
    short_name,
)

HEADLINE_SCORES = (
    "ms_corrected",
    "best_single_f1",
    "match@3",
    "delta_match@3",
    "match@3_patch",
    "delta_match@3_patch",
    "tapa",
    "tapa_patch",
    "lca_depth",
    "locality",
)
CSV_FILE = "compare.csv"
PNG_FILE = "compare.png"
MISSING = "-"
"""A score (or a baseline) an evaluation does not have; an undefined value is 'undefined' in
the text table and an empty cell in the CSV, as in the evaluation's own tables."""


@dataclass(frozen=True)
class Comparison:
    evaluations: list[ScoreCard]
    names: list[str]
    """One short name per evaluation, unique: the SAE's arch and size, then its path."""
    order: list[str]
    """Score names, in order of first appearance over the evaluations."""
    cells: dict[str, list[Score | None]]
    """Per score name, each evaluation's score (None where it lacks it)."""
    differs: list[str]
    """The `inputs` and `settings` fields (section.key) whose values differ, the SAE's own
    excepted (the SAEs are what is compared)."""

    def title(self, name: str) -> str:
        return next(s.title for s in self.cells[name] if s is not None)

    def variants(self) -> list[str]:
        """Variants present in any score of any evaluation, trained first."""
        return [
            v
            for v in VARIANTS
            if v == "trained" or any(v in s.values for c in self.cells.values() for s in c if s)
        ]

    def _variants_of(self, i: int) -> list[str]:
        present = {v for c in self.cells.values() if c[i] is not None for v in c[i].values}
        return [v for v in VARIANTS if v == "trained" or v in present]

    def table(self) -> str:
        """The comparison as aligned text: per evaluation the trained value [interval] and the
        baselines' values; '*' marks a trained value not distinguishable from a baseline."""
        lines = [f"{len(self.names)} evaluations:"]
        lines += [f"  {n}: {ev.path}" for n, ev in zip(self.names, self.evaluations, strict=True)]
        lines.append(self._differ_line())
        groups = [self._variants_of(i) for i in range(len(self.names))]
        header = ["score"]
        for i, vs in enumerate(groups):
            level = f"{self.evaluations[i].settings['level']:.0%}"
            header += [f"trained [{level}]" if v == "trained" else LABELS[v] for v in vs]
        rows = [header]
        starred = False
        for name in self.order:
            row = [name]
            for i, vs in enumerate(groups):
                s = self.cells[name][i]
                for v in vs:
                    if s is None:
                        row.append(MISSING)
                        continue
                    text = format_value(s.values.get(v), ci=v == "trained")
                    if v == "trained" and s.indistinct() and text != "undefined":
                        text += "*"
                        starred = True
                    row.append(text)
            rows.append(row)
        bounds = []  # the first and last column of each evaluation's group
        start = 1
        for vs in groups:
            bounds.append((start, start + len(vs)))
            start += len(vs)
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        spans = [" " * widths[0]]
        for n, (a, b) in zip(self.names, bounds, strict=True):
            width = sum(widths[a:b]) + 2 * (b - a - 1)
            spans.append(n[:width].ljust(width))
        lines.append(" | ".join(spans).rstrip())
        for r in rows:
            cells = [r[0].ljust(widths[0])]
            for a, b in bounds:
                cells.append("  ".join(r[c].ljust(widths[c]) for c in range(a, b)))
            lines.append(" | ".join(cells).rstrip())
        if starred:
            lines.append(
                "* not distinguishable from a baseline: the interval of (trained - baseline) "
                "includes 0"
            )
        lines.append(
            f"{MISSING}: not in that evaluation (or that baseline was not run); undefined: the "
            "score has no value"
        )
        return "\n".join(lines)

    def _differ_line(self) -> str:
        if not self.differs:
            return "inputs other than the SAE, and settings: the same in every evaluation"
        return "inputs that differ: " + ", ".join(self.differs)

    def _csv_columns(self) -> list[tuple[int, str]]:
        """(evaluation, what) per value column; what: '<variant>', '<variant> lo|hi' or
        'separates <baseline>'. The header names it '<evaluation name> <what>'."""
        variants = self.variants()
        baselines = [
            b
            for b in BASELINES
            if any(b in s.separates for c in self.cells.values() for s in c if s)
        ]
        whats = [f"{v}{bound}" for v in variants for bound in ("", " lo", " hi")]
        whats += [f"separates {b}" for b in baselines]
        return [(e, what) for e in range(len(self.names)) for what in whats]

    def csv_text(self) -> str:
        """One row per score. Floats are written to read back exactly; '-' where the
        evaluation lacks the score or the baseline, empty where the value is undefined."""
        columns = self._csv_columns()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["score", "title", "group"] + [f"{self.names[e]} {x}" for e, x in columns])
        for name in self.order:
            cells = self.cells[name]
            first = next(s for s in cells if s is not None)
            w.writerow(
                [name, first.title, first.group] + [_csv_cell(cells[e], x) for e, x in columns]
            )
        return buf.getvalue()

    def plot(self, path: str | os.PathLike[str], scores: Sequence[str] | None = None) -> Path:
        """One panel per score (`scores`, default the headline ones present, else every
        score): x = evaluations, the trained value with its interval beside each baseline's,
        the chance level dotted where the score has one. Per score rather than per group,
        since a group mixes scales (TAPAScore in [-2, 2] beside its leakage in [0, 1])."""
        wanted = HEADLINE_SCORES if scores is None else tuple(scores)
        unknown = [name for name in wanted if scores is not None and name not in self.cells]
        if unknown:
            raise VisaeError(f"no score {unknown[0]!r} in the evaluations compared")
        order = [name for name in self.order if name in wanted] or self.order
        n = len(order)
        ncols = min(4, n)
        nrows = math.ceil(n / ncols)
        height = 2.7 * nrows + 0.4
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(3.6 * ncols, height), dpi=100, squeeze=False
        )
        variants = self.variants()
        width = 0.7 / len(variants)
        for ax, name in zip(axes.flat, order, strict=False):
            cells = self.cells[name]
            for i, v in enumerate(variants):
                xs, ys, lo, hi = [], [], [], []
                for e, s in enumerate(cells):
                    val = None if s is None else s.values.get(v)
                    if val is None or val.value is None:
                        continue
                    xs.append(e - 0.35 + (i + 0.5) * width)
                    ys.append(val.value)
                    ci = val.ci or (val.value, val.value)
                    lo.append(ci[0])
                    hi.append(ci[1])
                ax.vlines(xs, lo, hi, color=COLORS[v], linewidth=1.5)
                ax.scatter(xs, ys, color=COLORS[v], s=18, zorder=3)
            for e, s in enumerate(cells):
                trained = None if s is None else s.values.get("trained")
                if trained is None or trained.value is None:
                    text = "absent" if s is None else "undefined"
                    ax.text(
                        e,
                        0.5,
                        text,
                        transform=ax.get_xaxis_transform(),
                        ha="center",
                        fontsize=7,
                        color="#888",
                    )
            chance = next((s.chance for s in cells if s is not None and s.chance is not None), None)
            if chance is not None:
                ax.axhline(chance, color="k", linestyle=":", linewidth=1)
            ax.set_xlim(-0.6, len(self.names) - 0.4)
            ax.set_xticks(
                range(len(self.names)),
                [mpl_text(x) for x in self.names],
                rotation=20,
                ha="right",
                fontsize=7,
            )
            ax.set_title(mpl_text(f"{self.title(name)} [{name}]"), fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        handles = [
            Line2D([], [], color=COLORS[v], marker="o", linestyle="-", label=LABELS[v])
            for v in variants
        ]
        if any(s is not None and s.chance is not None for c in self.cells.values() for s in c):
            handles.append(Line2D([], [], color="k", linestyle=":", label="chance"))
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
        try:
            fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        out = Path(path)
        write_bytes(out, buf.getvalue())
        return out


def _csv_cell(s: Score | None, what: str) -> str:
    """`what`: '<variant>', '<variant> lo', '<variant> hi' or 'separates <baseline>'."""
    if s is None:
        return MISSING
    if what.startswith("separates "):
        b = what[len("separates ") :]
        if b not in s.separates:
            return MISSING
        sep = s.separates[b]
        return "" if sep is None else str(sep).lower()
    variant, _, bound = what.partition(" ")
    val = s.values.get(variant)
    if val is None:
        return MISSING
    if not bound:
        return "" if val.value is None else repr(val.value)
    return "" if val.ci is None else repr(val.ci[0 if bound == "lo" else 1])


def compare(
    eval_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    plot_scores: Sequence[str] | None = None,
) -> Comparison:
    """Read the evaluation folders and put their scores side by side; with `out`, write
    `out/compare.csv` (every score) and `out/compare.png` (`plot_scores`, default the
    headline scores)."""
    if not eval_dirs:
        raise VisaeError("compare needs at least one evaluation folder")
    evals = [load_score_card(d) for d in eval_dirs]
    order: list[str] = []
    for ev in evals:
        order += [s.name for s in ev.scores if s.name not in order]
    if not order:
        raise VisaeError("the evaluations hold no score: " + ", ".join(str(d) for d in eval_dirs))
    cells = {
        name: [next((s for s in ev.scores if s.name == name), None) for ev in evals]
        for name in order
    }
    result = Comparison(
        evaluations=evals,
        names=_names(evals),
        order=order,
        cells=cells,
        differs=_differs(evals),
    )
    if out is not None:
        folder = Path(out)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VisaeError(f"cannot create {folder}: {e.strerror or e}") from None
        write_text(folder / CSV_FILE, result.csv_text())
        result.plot(folder / PNG_FILE, plot_scores)
    return result


def _names(evals: list[ScoreCard]) -> list[str]:
    """`short_name` of each SAE; where two share one, the shortest tail of their SAE paths
    that tells them apart is added, and a position where even the paths are equal."""
    base = [short_name(ev) for ev in evals]
    names = list(base)
    for b in set(base):
        same = [i for i, x in enumerate(base) if x == b]
        if len(same) < 2:
            continue
        parts = [Path(evals[i].inputs["sae"]["path"]).parts for i in same]
        for depth in range(1, max(len(p) for p in parts) + 1):
            tails = ["/".join(p[-depth:]) for p in parts]
            if len(set(tails)) == len(tails):
                for i, t in zip(same, tails, strict=True):
                    names[i] = f"{b} ({t})"
                break
        else:
            for i in same:
                names[i] = f"{b} #{i + 1}"
    return names


def _differs(evals: list[ScoreCard]) -> list[str]:
    sections = {
        name: [ev.inputs[name] for ev in evals] for name in evals[0].inputs if name != "sae"
    }
    sections["settings"] = [ev.settings for ev in evals]
    out = []
    for name, values in sections.items():
        if any(v is None for v in values):
            if not all(v is None for v in values):
                out.append(name)
            continue
        keys = list(dict.fromkeys(k for v in values for k in v))
        for key in keys:
            seen = {json.dumps(v.get(key), sort_keys=True) if key in v else None for v in values}
            if len(seen) > 1:
                out.append(f"{name}.{key}")
    return out
