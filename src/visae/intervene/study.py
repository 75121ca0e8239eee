"""The intervention study (Stevens et al.): for latents matched to concepts, set the latent on
every patch token of held-out images to multiples of its maximum activation (0 suppresses it)
and measure how often a downstream head's output changes on the concept's target (its patches
for a dense head, its images for a classification head) against everywhere else, beside random
latents matched in firing frequency, with bootstrap intervals over latents.

Change, per head kind: a classification head's top-1 class changes on an image; a dense head
with several channels (a segmentation probe) changes a patch's argmax class; a one-channel dense
head (saliency) moves a patch's value by more than `dense_threshold`. Dense outputs are
averaged onto the concept labels' patch grid first.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from visae.atomic import write_bytes, write_text
from visae.errors import VisaeError
from visae.eval.config import finite_json
from visae.intervene.apply import MaxActivations, check_pair, intervene
from visae.intervene.edits import Edit, Region
from visae.intervene.show import plot_before_after

if TYPE_CHECKING:
    from visae.backbones import Backbone
    from visae.eval.sources import ConceptLabels
    from visae.heads import Head
    from visae.sae import SAE
    from visae.store import ActivationStore

SCHEMA = "visae.intervention-study/1"


@dataclass(frozen=True)
class StudyConfig:
    """`values`: the dose-response grid, in units of each latent's max activation (the latent
    is set to v x max on every patch token; 0 ablates it); `suppress` and `amplify` are the two
    headline doses. `max_latents` matched latents (best F1 first, one per concept, F1 at least
    `min_f1`), `controls` random latents per matched one, `images` per group (target, other)."""

    values: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    suppress: float = 0.0
    amplify: float = 2.0
    max_latents: int = 10
    min_f1: float = 0.2
    controls: int = 1
    images: int = 8
    dense_threshold: float = 0.1
    n_resamples: int = 1000
    level: float = 0.95
    seed: int = 0
    batch_images: int = 16

    def __post_init__(self) -> None:
        for dose in (self.suppress, self.amplify):
            if dose not in self.values:
                raise VisaeError(f"dose {dose} must be one of the values {self.values}")
        for name in ("max_latents", "images", "batch_images", "n_resamples"):
            if getattr(self, name) < 1:
                raise VisaeError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.controls < 0:
            raise VisaeError(f"controls must be >= 0, not {self.controls}")


@dataclass(frozen=True)
class Target:
    """A latent to edit and the concept whose patches or images are its target."""

    latent: int
    concept: str
    f1: float | None = None
    frequency: float | None = None
    control_of: int | None = None  # the matched latent a random control stands beside


def matched_latents(evaluation: str | Path, config: StudyConfig) -> list[Target]:
    """The best latent per concept from an evaluation's `latents_trained.csv` (F1 >= min_f1),
    best F1 first."""
    path = Path(evaluation) / "latents_trained.csv"
    if not path.is_file():
        raise VisaeError(f"{evaluation} is not an evaluation folder (no latents_trained.csv)")
    with open(path, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["concept"] and r["concept_f1"]]
    best: dict[str, dict[str, str]] = {}
    for r in rows:
        if float(r["concept_f1"]) >= config.min_f1 and (
            r["concept"] not in best
            or float(r["concept_f1"]) > float(best[r["concept"]]["concept_f1"])
        ):
            best[r["concept"]] = r
    chosen = sorted(best.values(), key=lambda r: -float(r["concept_f1"]))[: config.max_latents]
    if not chosen:
        raise VisaeError(f"no latent of {evaluation} matches a concept with F1 >= {config.min_f1}")
    return [
        Target(int(r["latent"]), r["concept"], float(r["concept_f1"]), float(r["frequency"]))
        for r in chosen
    ]


def latent_frequency(evaluation: str | Path) -> np.ndarray:
    """[L] each latent's image firing frequency, from an evaluation's per-latent table."""
    path = Path(evaluation) / "latents_trained.csv"
    if not path.is_file():
        raise VisaeError(f"{evaluation} is not an evaluation folder (no latents_trained.csv)")
    with open(path, encoding="utf-8") as f:
        return np.asarray([float(r["frequency"] or 0) for r in csv.DictReader(f)])


def frequency_controls(
    targets: list[Target], frequency: np.ndarray, config: StudyConfig
) -> list[Target]:
    """Per matched latent, `controls` other live latents of the nearest firing frequency
    (random among equally near ones, seeded), edited on the same concept's images."""
    rng = np.random.default_rng(config.seed)
    taken = {t.latent for t in targets}
    out = []
    for t in targets:
        f = frequency[t.latent]
        pool = np.asarray([j for j in np.flatnonzero(frequency > 0) if j not in taken])
        if not len(pool):
            break
        order = np.lexsort((rng.random(len(pool)), np.abs(frequency[pool] - f)))
        for j in pool[order[: config.controls]]:
            taken.add(int(j))
            out.append(Target(int(j), t.concept, None, float(frequency[j]), control_of=t.latent))
    return out


class _Group:
    """Images of one group, preprocessed once, and the head's unedited output on them
    (computed on first use)."""

    def __init__(self, images: np.ndarray, pixels: torch.Tensor, labels: np.ndarray | None):
        self.images, self.pixels, self.labels = images, pixels, labels
        self._before: torch.Tensor | None = None

    def before(self, backbone: Backbone, head: Head, batch: int) -> torch.Tensor:
        if self._before is None:
            self._before = _outputs(backbone, head, self.pixels, batch)
        return self._before


def run_study(
    backbone: Backbone,
    sae: SAE,
    head: Head,
    store: ActivationStore,
    concepts: ConceptLabels,
    targets: list[Target],
    out: str | Path,
    config: StudyConfig | None = None,
    *,
    max_acts: MaxActivations,
    frequency: np.ndarray | None = None,
    images: np.ndarray | None = None,
    images_rule: str = "all images",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study (module docstring) and write `out/study.json` and `out/study.html`."""
    from visae.store import open_dataset

    config = config or StudyConfig()
    layer = check_pair(backbone, sae)
    head.check_reads_after(layer)
    dataset = open_dataset(store, progress=False)
    meta = store.metadata()
    pool = np.arange(store.n_images) if images is None else np.asarray(images)
    # the scenes' edited pair copies are near-duplicates of scenes: left out, as evaluate does
    pool = np.asarray([i for i in pool if meta[int(i)].get("role") != "edit"], dtype=np.int64)
    dense = head.kind == "dense"
    if dense and not concepts.has_masks:
        raise VisaeError(f"a dense head needs concepts with masks; {concepts.source} has none")
    region = Region("all")  # every token the SAE reads: its patches (or its CLS token)
    controls: list[Target] = []
    if config.controls:
        if frequency is None:
            raise VisaeError("random controls need each latent's frequency (from an evaluation)")
        controls = frequency_controls(targets, frequency, config)
    rng = np.random.default_rng(config.seed)
    weights_hash = backbone.weights_hash
    results = []
    bar = tqdm(
        total=len(targets) + len(controls),
        unit="latent",
        desc="intervention study",
        disable=not progress,
    )
    groups_of: dict[str, tuple[_Group, _Group]] = {}
    for t in [*targets, *controls]:
        if t.concept not in groups_of:
            groups_of[t.concept] = _groups(
                t.concept, concepts, pool, meta, dataset, backbone, layer, config, rng, dense
            )
        target_group, other_group = groups_of[t.concept]
        rates = {}
        for value in config.values:
            edit = Edit((t.latent,), "set", value, relative=True, region=region)
            args = (backbone, sae, head, edit, max_acts, config, weights_hash)
            on_target = _changed(target_group, *args, column=_column(head, t.concept))
            if dense:  # target: the concept's patches; other: the rest of the same images
                labels = target_group.labels
                rates[value] = {
                    "target": _rate(on_target, labels),
                    "other": _rate(on_target, ~labels),
                }
            else:
                on_other = _changed(other_group, *args, column=_column(head, t.concept))
                rates[value] = {"target": _rate(on_target), "other": _rate(on_other)}
        results.append(
            {
                **asdict(t),
                "n_target": len(target_group.images),
                "n_other": len(target_group.images if dense else other_group.images),
                "rates": rates,
            }
        )
        bar.update(1)
    bar.close()
    doc = {
        "schema": SCHEMA,
        "inputs": {
            "sae": str(sae.checkpoint_info.get("path", "")),
            "layer": layer,
            "backbone": backbone.name,
            "head": {"name": head.name, "kind": head.kind, "layer": head.layer},
            "concepts": concepts.source,
            "images": images_rule,
            "target": "the concept's labelled patches (other: the rest of the same images)"
            if dense
            else "images with the concept (other: images without it)",
        },
        "settings": asdict(config),
        "latents": results,
        "summary": _summary(results, config),
    }
    doc["dose_response"] = doc["summary"].pop("dose_response")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc["examples"] = _examples(backbone, sae, head, targets, groups_of, config, max_acts, out)
    write_text(out / "study.json", json.dumps(finite_json(doc), indent=1) + "\n")
    plot = _plot(doc, out)
    write_text(out / "study.html", _page(doc, plot))
    return doc


def _groups(
    concept: str,
    concepts: ConceptLabels,
    pool: np.ndarray,
    meta: list[dict[str, Any]],
    dataset: Any,
    backbone: Backbone,
    layer: int,
    config: StudyConfig,
    rng: np.random.Generator,
    dense: bool,
) -> tuple[_Group, _Group]:
    """(images with the concept, images without it), at most `images` each, seeded; for a dense
    head the concept's patch labels on the target images."""
    c = concepts.names.index(concept)
    has = concepts.labels_NC[pool, c]
    groups = []
    for chosen in (pool[has], pool[~has]):
        if len(chosen) > config.images:
            chosen = np.sort(rng.choice(chosen, config.images, replace=False))
        pixels = (
            backbone.preprocess(
                [dataset.image(int(meta[i].get("dataset_index", i))) for i in chosen]
            )
            if len(chosen)
            else torch.zeros(0)
        )
        labels = None
        if dense and len(chosen):
            grid = backbone.layout(layer).grid
            labels = (
                concepts.patch_labels(chosen, layer)[:, c].toarray().reshape(len(chosen), *grid)
            )
        groups.append(_Group(chosen, pixels, labels))
    if not len(groups[0].images):
        raise VisaeError(f"no image among those studied has concept {concept!r}")
    return groups[0], groups[1]


def _outputs(backbone: Backbone, head: Head, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([head(backbone, pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def _changed(
    group: _Group,
    backbone: Backbone,
    sae: SAE,
    head: Head,
    edit: Edit,
    max_acts: MaxActivations,
    config: StudyConfig,
    weights_hash: str,
    column: int | None = None,
) -> np.ndarray | None:
    """Whether the head's output changes under the edit: per image (classification: top-1, or
    for a multi-label head the yes/no of the concept's own label, `column`, else of any label)
    or per patch `[B, h, w]` of the labels' grid (dense); None for an empty group."""
    if not len(group.images):
        return None
    before = group.before(backbone, head, config.batch_images)
    with intervene(backbone, sae, [edit], max_acts=max_acts, weights_hash=weights_hash):
        after = _outputs(backbone, head, group.pixels, config.batch_images)
    if head.kind == "classification" and head.multilabel:
        flips = (before > 0) != (after > 0)
        return (flips[:, column] if column is not None else flips.any(dim=1)).numpy()
    if head.kind == "classification":
        return (before.argmax(1) != after.argmax(1)).numpy()
    grid = group.labels.shape[1:]
    b = torch.nn.functional.adaptive_avg_pool2d(before.float(), grid)
    a = torch.nn.functional.adaptive_avg_pool2d(after.float(), grid)
    if b.shape[1] > 1:
        return (b.argmax(1) != a.argmax(1)).numpy()
    return ((a - b).abs()[:, 0] > config.dense_threshold).numpy()


def _column(head: Head, concept: str) -> int | None:
    return head.labels.index(concept) if head.multilabel and concept in head.labels else None


def _rate(changed: np.ndarray | None, mask: np.ndarray | None = None) -> float | None:
    """Fraction of the (masked) units that changed; None without any."""
    if changed is None:
        return None
    if mask is not None:
        changed = changed[mask]
    return float(changed.mean()) if changed.size else None


def _summary(results: list[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per headline dose: matched and control latents' target and other change rates with
    intervals, the selectivity (target - other) of each, and whether matched latents are more
    selective than the controls (interval of the difference excludes 0)."""
    from visae.eval.bootstrap import bootstrap_ci, difference_ci

    def items(kind: str, value: float, control: bool) -> np.ndarray:
        rows = [r for r in results if (r["control_of"] is not None) == control]
        vals = [r["rates"][value][kind] for r in rows]
        return np.asarray([v if v is not None else math.nan for v in vals], dtype=float)

    def ci(x: np.ndarray) -> dict[str, Any]:
        x = x[~np.isnan(x)]
        if len(x) < 2:
            return {"value": float(x.mean()) if len(x) else None, "ci": None, "n": len(x)}
        m, lo, hi = bootstrap_ci(x, np.mean, config.n_resamples, config.level, config.seed)
        return {"value": m, "ci": [lo, hi], "n": len(x)}

    out: dict[str, Any] = {}
    for name, value in (("suppress", config.suppress), ("amplify", config.amplify)):
        entry: dict[str, Any] = {"value": value}
        for group, control in (("matched", False), ("controls", True)):
            t, o = items("target", value, control), items("other", value, control)
            entry[group] = {"target": ci(t), "other": ci(o), "selectivity": ci(t - o)}
        m = items("target", value, False) - items("other", value, False)
        c = items("target", value, True) - items("other", value, True)
        m, c = m[~np.isnan(m)], c[~np.isnan(c)]
        if len(m) >= 2 and len(c) >= 2:
            d, lo, hi = difference_ci(m, c, np.mean, config.n_resamples, config.level, config.seed)
            entry["matched_minus_controls"] = {
                "value": d,
                "ci": [lo, hi],
                "separates": bool(lo > 0 or hi < 0),
                "direction": "more selective" if d > 0 else "less selective",
            }
        out[name] = entry
    out["dose_response"] = [
        {
            "value": v,
            **{
                group: {kind: ci(items(kind, v, control)) for kind in ("target", "other")}
                for group, control in (("matched", False), ("controls", True))
            },
        }
        for v in config.values
    ]
    return out


def _plot(doc: dict[str, Any], out: Path) -> str:
    """Mean change rate per dose, target and other, matched latents and controls, with their
    intervals over latents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    doses = doc["dose_response"]
    xs = [d["value"] for d in doses]
    for group, color in (("matched", "#3b6ea8"), ("controls", "#8a8a8a")):
        for kind, style in (("target", "-"), ("other", "--")):
            cells = [d[group][kind] for d in doses]
            if all(c["value"] is None for c in cells):
                continue
            ys = [math.nan if c["value"] is None else c["value"] for c in cells]
            lo = [y - c["ci"][0] if c["ci"] else 0.0 for y, c in zip(ys, cells, strict=True)]
            hi = [c["ci"][1] - y if c["ci"] else 0.0 for y, c in zip(ys, cells, strict=True)]
            name = "random controls" if group == "controls" else "matched latents"
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                fmt=style,
                color=color,
                marker="o",
                capsize=3,
                label=f"{name}, {kind}",
            )
    ax.set_xlabel("latent set to v x its max activation (0 = ablated)")
    ax.set_ylabel("change rate of the head")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(out / "dose_response.png", buf.getvalue())
    return "dose_response.png"


def _examples(
    backbone: Backbone,
    sae: SAE,
    head: Head,
    targets: list[Target],
    groups_of: dict[str, tuple[_Group, _Group]],
    config: StudyConfig,
    max_acts: MaxActivations,
    out: Path,
    n: int = 4,
) -> list[dict[str, Any]]:
    """Before/after of the amplify and suppress doses on the first target image of the first
    `n` matched latents, as PNGs beside the page."""
    folder = out / "examples"
    folder.mkdir(exist_ok=True)
    examples = []
    for t in targets[:n]:
        group = groups_of[t.concept][0]
        pixels = group.pixels[:1]
        view = _view(pixels, backbone)
        before = head(backbone, pixels)
        for name, value in (("amplify", config.amplify), ("suppress", config.suppress)):
            edit = Edit((t.latent,), "set", value, relative=True, region=Region("all"))
            with intervene(backbone, sae, [edit], max_acts=max_acts):
                after = head(backbone, pixels)
            file = f"examples/latent{t.latent}_{name}.png"
            plot_before_after(
                head,
                view,
                before,
                after,
                f"latent {t.latent} ({t.concept}) set to {value:g} x max",
                out / file,
                5,
            )
            examples.append(
                {
                    "latent": t.latent,
                    "concept": t.concept,
                    "dose": name,
                    "image": int(group.images[0]),
                    "file": file,
                }
            )
    return examples


def _view(pixels: torch.Tensor, backbone: Backbone) -> Any:
    """The model's input picture back from its normalised pixels (for the example plots)."""
    from PIL import Image

    pre = backbone.preprocessing
    mean = torch.tensor(pre.get("mean", [0.0, 0.0, 0.0]))[:, None, None]
    std = torch.tensor(pre.get("std", [1.0, 1.0, 1.0]))[:, None, None]
    scale = float(pre.get("rescale_factor", 1 / 255))
    rgb = ((pixels[0].cpu() * std + mean) / scale).clamp(0, 255).byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def _page(doc: dict[str, Any], plot: str) -> str:
    import html

    def cell(v: dict[str, Any] | None) -> str:
        if not v or v.get("value") is None:
            return "-"
        ci = v.get("ci")
        return f"{v['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    rows = []
    for name, entry in doc["summary"].items():
        for group in ("matched", "controls"):
            g = entry[group]
            rows.append(
                f"<tr><td>{name} (v = {entry['value']:g})</td><td>{group}</td>"
                f"<td>{cell(g['target'])}</td><td>{cell(g['other'])}</td>"
                f"<td>{cell(g['selectivity'])}</td></tr>"
            )
        diff = entry.get("matched_minus_controls")
        if diff:
            verdict = (
                f"matched latents {diff['direction']} than controls"
                if diff["separates"]
                else "NOT distinguishable from controls"
            )
            rows.append(
                f"<tr><td colspan=4>{name}: matched - controls selectivity</td>"
                f"<td>{cell(diff)} ({verdict})</td></tr>"
            )
    latents = "".join(
        f"<tr><td>{r['latent']}</td><td>{html.escape(r['concept'])}</td>"
        f"<td>{'control of ' + str(r['control_of']) if r['control_of'] is not None else 'matched'}"
        f"</td>"
        + "".join(
            f"<td>{_pct(r['rates'][v]['target'])} / {_pct(r['rates'][v]['other'])}</td>"
            for v in doc["settings"]["values"]
        )
        + "</tr>"
        for r in doc["latents"]
    )
    heads = "".join(f"<th>v = {v:g}</th>" for v in doc["settings"]["values"])
    inputs = html.escape(json.dumps(doc["inputs"], indent=1))
    return (
        "<!doctype html><meta charset=utf-8><title>visae intervention study</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em auto;max-width:1100px}"
        "td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}"
        "table{border-collapse:collapse}</style>"
        "<h1>Intervention study</h1>"
        f"<pre>{inputs}</pre>"
        "<h2>Change rates (target / other), with 95% intervals over latents</h2>"
        "<table><tr><th>dose</th><th>latents</th><th>target</th><th>other</th>"
        f"<th>selectivity (target - other)</th></tr>{''.join(rows)}</table>"
        f"<h2>Dose response</h2><img src='{plot}' alt='dose response'>"
        "<h2>Examples (the head before and after, on a target image)</h2>"
        + "".join(
            f"<figure><img src='{html.escape(e['file'])}' alt='example'><figcaption>latent "
            f"{e['latent']} ({html.escape(e['concept'])}), {e['dose']}, store image "
            f"{e['image']}</figcaption></figure>"
            for e in doc["examples"]
        )
        + f"<h2>Per latent (target / other)</h2><table><tr><th>latent</th><th>concept</th>"
        f"<th>kind</th>{heads}</tr>{latents}</table>"
    )


def _mean(values: list[float | None]) -> float:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else math.nan


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"
