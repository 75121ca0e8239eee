"""A study's scores as a page: per SAE and protocol the chance-anchored score with its interval
(0 is a random responder, 1 a perfect one), beside the evaluation's automated proxies and their
correlation with the per-feature human scores, and the typed names against the features'
labels beside names of other features."""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from visae.atomic import write_bytes, write_text


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def scores_plot(scores: list[dict[str, Any]]) -> bytes:
    """S per SAE and protocol with its 95% interval, chance (0) and perfect (1) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * max(1, len(scores))))
    labels = [f"{s['sae']} · {s['protocol']}" for s in scores]
    y = np.arange(len(scores))
    if scores:
        mean = np.array([s["mean"] for s in scores])
        err = np.array([[s["mean"] - s["lo"], s["hi"] - s["mean"]] for s in scores]).T
        ax.errorbar(mean, y, xerr=err, fmt="o", color="#1f6fb4", capsize=4)
    ax.axvline(0, color="#999", ls="--", lw=1, label="chance (random responder)")
    ax.axvline(1, color="#2a2", ls=":", lw=1, label="perfect")
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.7, len(scores) - 0.3)
    ax.set_xlim(-0.3, 1.1)
    ax.set_xlabel("chance-anchored score S (95% interval over participants and features)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8, frameon=False)
    return _figure_png(fig)


def proxy_plot(result: dict[str, Any], analyses: dict[str, Any], proxy: str) -> bytes | None:
    """Per-feature human score against one automated proxy, one colour per SAE x protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    drawn = False
    for s in result["scores"]:
        metrics = analyses[s["sae"]].metrics
        if proxy not in metrics:
            continue
        rows = [
            f for f in result["features"] if (f["sae"], f["protocol"]) == (s["sae"], s["protocol"])
        ]
        x = [float(metrics[proxy][f["latent"]]) for f in rows]
        ax.scatter(x, [f["score"] for f in rows], s=14, label=f"{s['sae']} · {s['protocol']}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="#999", ls="--", lw=1)
    ax.set_xlabel(f"{proxy} (evaluation suite)")
    ax.set_ylabel("human score S per feature")
    ax.legend(fontsize=7)
    return _figure_png(fig)


NO_PROXIES = "<p>The analyses carry no evaluation proxies (run visae evaluate --analysis).</p>"


def _fmt(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def write_report(
    result: dict[str, Any], analyses: dict[str, Any], out: str | Path, title: str
) -> Path:
    """`out/report.html` with its plots beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "scores.png", scores_plot(result["scores"]))
    rows = []
    for s in result["scores"]:
        verdict = (
            "above chance"
            if s["lo"] > 0
            else "below chance"
            if s["hi"] < 0
            else "cannot be told from chance"
        )
        proxies = "; ".join(
            f"{k}: ρ {'undefined (constant)' if v['spearman'] is None else _fmt(v['spearman'])}"
            f" (n {v['n']})"
            for k, v in s["proxy_correlation"].items()
        )
        rows.append(
            f"<tr><td>{html.escape(s['sae'])}</td><td>{s['protocol']}</td>"
            f"<td>{_fmt(s['mean'])}</td><td>[{_fmt(s['lo'])}, {_fmt(s['hi'])}]</td>"
            f"<td>{s['n_participants']}</td><td>{s['n_features']}</td><td>{verdict}</td>"
            f"<td>{html.escape(proxies) or '–'}</td></tr>"
        )
    plots = []
    for proxy in ("locality", "ms", "concept_f1"):
        data = proxy_plot(result, analyses, proxy)
        if data is not None:
            write_bytes(out / f"proxy_{proxy}.png", data)
            plots.append(f'<img src="proxy_{proxy}.png" alt="human score vs {proxy}">')
    names = []
    for n in result.get("names", []):
        names.append(
            f"<tr><td>{html.escape(n['sae'])}</td><td>{n['n_names']}</td>"
            + "".join(
                f"<td>{_fmt(n[k]['mean'])} [{_fmt(n[k]['lo'])}, {_fmt(n[k]['hi'])}]</td>"
                for k in ("own_label", "other_label", "difference")
            )
            + f"<td>{n['verdict']}</td></tr>"
        )
    ex = result["exclusions"]
    names_html = (
        "<h2>Names against the features' labels (MiniLM cosine)</h2><table><tr><th>SAE</th>"
        "<th>names</th><th>own label</th><th>another feature's label</th><th>difference</th>"
        "<th>verdict</th></tr>" + "".join(names) + "</table>"
        if names
        else ""
    )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}: scores</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto}}
td,th{{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:left}}
table{{border-collapse:collapse}}</style></head><body>
<h1>{html.escape(title)}: human interpretability scores</h1>
<p>S = (s − chance) / (1 − chance) per trial: 0 is what a random responder scores, 1 a perfect
one. Intervals: 95% bootstrap over participants and features.</p>
<p>Excluded before scoring: {len(ex["participants"])} participants (failed attention checks),
{ex["fast_trials"]} main trials faster than the spec's minimum.</p>
<table><tr><th>SAE</th><th>protocol</th><th>S</th><th>95% interval</th><th>participants</th>
<th>features</th><th>verdict</th><th>correlation with proxies (Spearman)</th></tr>
{"".join(rows)}</table>
<img src="scores.png" alt="scores with intervals">
{names_html}
<h2>Per feature, beside the automated proxies</h2>
{"".join(plots) or NO_PROXIES}
</body></html>
"""
    write_text(out / "report.html", page)
    return out / "report.html"
