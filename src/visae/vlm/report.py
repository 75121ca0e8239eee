"""The steering report: a dose-response plot per setting (steered success and similarity beside
the three baselines, with intervals), the rates as a table, and examples (the image, the
latent's top images from the analysis, the answer before and after)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

from visae.atomic import write_text

BASELINES = (
    ("unsteered", "unsteered"),
    ("random_latent", "random latent"),
    ("shuffled_names", "shuffled names"),
)
METRICS = (("success", "taxonomy match rate"), ("similarity", "similarity to the concept name"))
EXAMPLES_PER_TARGET = 3


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def plot_doses(summary: dict[str, Any], path: Path) -> None:
    """Both metrics against the set value: steered and each baseline, 95% intervals."""
    doses = summary["doses"]
    values = [d["value"] for d in doses]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        lines = [("steered", "steered", "-o"), *((k, n, "--") for k, n in BASELINES)]
        for key, name, style in lines:
            mean = [d[metric][key]["mean"] for d in doses]
            lo = [d[metric][key]["mean"] - d[metric][key]["lo"] for d in doses]
            hi = [d[metric][key]["hi"] - d[metric][key]["mean"] for d in doses]
            ax.errorbar(values, mean, yerr=[lo, hi], fmt=style, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("set value" + (" (x latent max)" if summary.get("relative", True) else ""))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"setting: {summary['setting']} ({len(summary['targets'])} latents)")
    try:
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _thumb(image: Image.Image, path: Path, size: int = 112) -> str:
    im = image.convert("RGB").copy()
    im.thumbnail((size, size))
    im.save(path, quality=90)
    return path.name


def _top_images(analysis: Any, latent: int, folder: Path, n: int = 4) -> list[str]:
    """The latent's top-image thumbnails from the analysis, copied beside the report (so it
    can be moved), as paths relative to it."""
    if analysis is None:
        return []
    import shutil

    out = []
    for rank, entry in enumerate(analysis.top(latent)[:n]):
        thumb = Path(analysis.path) / "thumbs" / f"{entry.image:07d}.jpg"
        if thumb.is_file():
            name = f"top_{latent}_{rank}.jpg"
            shutil.copyfile(thumb, folder / name)
            out.append(f"images/{name}")
    return out


def _rate(block: dict[str, Any]) -> str:
    return f"{block['mean']:.3f} [{block['lo']:.3f}, {block['hi']:.3f}]"


def _table(summary: dict[str, Any]) -> str:
    head = "".join(f"<th>{_e(n)}</th>" for _, n in BASELINES)
    rows = []
    for d in summary["doses"]:
        for metric, label in METRICS:
            b = d[metric]
            cells = "".join(
                f"<td>{_rate(b[k])}<br><small>steered - this: "
                f"{_e(b['minus_' + k]['verdict'])}</small></td>"
                for k, _ in BASELINES
            )
            rows.append(
                f"<tr><td>{d['value']:g}</td><td>{_e(label)}</td><td><b>{_rate(b['steered'])}</b></td>{cells}</tr>"
            )
    return (
        f"<table><tr><th>value</th><th>metric</th><th>steered</th>{head}</tr>"
        + "".join(rows)
        + "</table>"
    )


def write_report(
    out: Path,
    result: dict[str, Any],
    settings: list[Any],
    pictures: dict[str, Image.Image],
    analysis: str | Path | None,
) -> Path:
    """`out/report.html` with its plots and thumbnails beside it."""
    from visae.analysis import Analysis

    thumbs = out / "images"
    thumbs.mkdir(exist_ok=True)
    loaded = Analysis.load(analysis) if analysis is not None else None
    files = {i: _thumb(im, thumbs / f"{k:04d}.jpg") for k, (i, im) in enumerate(pictures.items())}
    parts = [
        "<!doctype html><meta charset='utf-8'><title>visae steering</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px}img{margin:2px;vertical-align:middle}"
        ".ex{margin:8px 0;padding:6px;border-bottom:1px solid #eee}</style>",
        f"<h1>Steering {_e(result['vlm'])} through its tower's SAE</h1>",
        f"<p>Layer {result['layer']}, mode <b>{_e(result['config']['mode'])}</b>, concepts: "
        f"{_e(result['concepts'])}; question: <i>{_e(result['config']['question'])}</i>; "
        f"{result['generations']} generations in {result['seconds']} s. Rates are per latent "
        "(mean over images) with 95% bootstrap intervals over latents; under each baseline, the "
        "verdict on the paired difference.</p>",
    ]
    for setting, summary in zip(settings, result["settings"], strict=True):
        plot = f"dose_{setting.name}.png"
        plot_doses(summary | {"relative": result["config"]["relative"]}, out / plot)
        parts.append(f"<h2>Setting: {_e(setting.name)}</h2><img src='{plot}' width='900'>")
        parts.append(_table(summary))
        parts.append(
            "<h3>Examples: each latent at its most successful value, answers that name the "
            "concept first</h3>"
        )
        for t in setting.targets:
            rates = [r for r in summary["per_latent"] if r["latent"] == t.latent]
            best = max(rates, key=lambda r: (r["success"] or 0.0, -r["value"]))["value"]
            rows = [
                r
                for r in setting.rows
                if r["kind"] == "steered" and r["target"] == t.latent and r["value"] == best
            ]
            rows = sorted(rows, key=lambda r: not r["match"])[:EXAMPLES_PER_TARGET]
            tops = "".join(
                f"<img src='{_e(u)}' width='64'>" for u in _top_images(loaded, t.latent, thumbs)
            )
            cells = "".join(
                f"<span><img src='images/{files[r['image']]}' width='72'> "
                f"{_e(r['before'])} &rarr; <b>{_e(r['after'])}</b> "
                f"{'&#10003;' if r['match'] else ''}</span> "
                for r in rows
            )
            parts.append(
                f"<div class='ex'>latent {t.latent} <b>{_e(t.concept)}</b> at {best:g}: "
                f"top images {tops}<br>{cells}</div>"
            )
    path = out / "report.html"
    write_text(path, "\n".join(parts))
    return path
