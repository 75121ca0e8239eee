"""PNG plots: latent firing-frequency histogram, NMSE-vs-L0 trade-off from training logs,
and one latent's activation histogram."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from visae.analysis.artifact import Analysis
from visae.errors import VisaeError


def plot_frequency_histogram(analysis: Analysis, out: str | os.PathLike[str]) -> Path:
    """Histogram of log10 patch-level firing frequency over live latents; dead latents are
    counted in the title, since they have no logarithm."""
    freq = analysis.table["freq_patch"]
    live = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if live.size:
        lo = math.floor(np.log10(live.min()))
        bins = np.linspace(lo, 0, max(10, 8 * (0 - lo)) + 1)
        ax.hist(np.log10(live), bins=bins, color="#3b6ea8")
    ax.set_xlabel("log10 firing frequency (fraction of patch tokens)")
    ax.set_ylabel("latents")
    n_dead = int((freq == 0).sum())
    ax.set_title(
        f"{analysis.name}\n{live.size} live, {n_dead} dead of {freq.size} latents", fontsize=9
    )
    return _save(fig, out)


def plot_latent_histogram(analysis: Analysis, latent: int, out: str | os.PathLike[str]) -> Path:
    """One latent's histogram of positive patch activations (log-spaced bins)."""
    if not 0 <= latent < analysis.n_latents:
        raise VisaeError(f"latent {latent} is out of range (0..{analysis.n_latents - 1})")
    counts = np.asarray(analysis.hist[latent])
    edges = analysis.hist_edges
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    nz = np.flatnonzero(counts)
    if nz.size:
        sl = slice(nz[0], nz[-1] + 1)
        ax.stairs(counts[sl], edges[sl.start : sl.stop + 1], fill=True, color="#3b6ea8")
        ax.set_xscale("log")
    ax.set_xlabel("activation (patch tokens where it fires)")
    ax.set_ylabel("patches")
    ax.set_title(f"latent {latent}: {int(counts.sum())} firing patches", fontsize=9)
    return _save(fig, out)


def read_training_logs(paths: Sequence[str | os.PathLike[str]]) -> dict[str, list[dict]]:
    """Records with `nmse` and `l0` from trainer JSON-lines logs, grouped by run.

    A path is a log file or a trainer output folder (every `*/metrics.jsonl` in it). A run is
    named by its records' `run` (or `sae`) field, else by the log's folder (the trainer writes
    `<out>/<run>/metrics.jsonl`); equal names from different folders get the parent folder as
    prefix. Where a run has evaluation records (`"kind": "eval"`) only those are kept.
    """
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(path.glob("*/metrics.jsonl"))
            if not found:
                raise VisaeError(f"no */metrics.jsonl training logs in {path}")
            files.extend(found)
        else:
            files.append(path)
    runs: dict[str, list[dict]] = {}
    owner: dict[str, Path] = {}
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise VisaeError(f"cannot read training log {path}: {e.strerror or e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise VisaeError(f"{path}:{n} is not a JSON line") from None
            if not isinstance(rec, dict) or rec.get("nmse") is None or rec.get("l0") is None:
                continue
            key = str(rec.get("run") or rec.get("sae") or path.parent.name)
            if owner.setdefault(key, path) != path:
                key = f"{path.parent.parent.name}/{key}"
                owner.setdefault(key, path)
            runs.setdefault(key, []).append(rec)
    if not runs:
        raise VisaeError(
            "no records with both 'nmse' and 'l0' in " + ", ".join(str(p) for p in files)
        )
    for key, recs in runs.items():
        evals = [r for r in recs if r.get("kind") == "eval"]
        runs[key] = evals or recs
    return runs


def plot_nmse_l0(
    logs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    groups: Mapping[str, str] | None = None,
) -> Path:
    """NMSE against L0 for every SAE run in the logs (files or trainer output folders, see
    `read_training_logs`): each run's evaluations as a faint path (ordered by tokens seen)
    and its final evaluation as a point. With `groups` (run name -> family, e.g. the
    architecture), each family gets one colour and a line through its runs' final points in
    order of L0: the trade-off curve of that family. Runs missing from `groups` form their own."""
    runs = read_training_logs(logs)
    family = {run: (groups or {}).get(run, run) for run in runs}
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted(set(family.values())))}
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    finals: dict[str, list[tuple[float, float]]] = {}
    for run, recs in sorted(runs.items()):
        recs = sorted(recs, key=lambda r: r.get("tokens", r.get("step", 0)))
        l0 = [float(r["l0"]) for r in recs]
        nmse = [float(r["nmse"]) for r in recs]
        color = colors[family[run]]
        if len(recs) > 1:
            ax.plot(l0, nmse, color=color, alpha=0.25, linewidth=1)
        finals.setdefault(family[run], []).append((l0[-1], nmse[-1]))
    for name, points in sorted(finals.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if groups is not None and len(points) > 1:
            ax.plot(xs, ys, color=colors[name], linewidth=1.8, marker="o", zorder=3, label=name)
        else:
            ax.scatter(xs, ys, color=colors[name], zorder=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("normalised MSE")
    what = (
        "final evaluation per run" if groups is None else "final evaluations, one line per family"
    )
    ax.set_title(f"reconstruction vs sparsity ({what})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, out)


def _save(fig: plt.Figure, out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
