"""Steering a VLM through its vision tower's SAE (Pach et al. 2025): set one SAE latent to a value
on every token (CLS included) of the tower layer the projector reads, let the language model
answer "What is shown in this image? Use exactly one word!" greedily, and check whether the
answer names the latent's concept.

A latent's concept is its matched concept from an evaluation (`latents_trained.csv`) or its top
label from an analysis; only concepts that name a thing count (`object:animals/birds`, a class
label; not `count:2` or `position:left`). An answer's first word scores two ways: a taxonomy
match (the word names the concept's node or anything under it: "crow" or "bird" for
`animals/birds`) and its cosine similarity to the concept's name under a sentence encoder
(all-MiniLM-L6-v2).

Baselines, each scored against the same latent's concept on the same images: the unsteered
model; the same edit on a random live latent (does any edit of that size say the word?); and
the steered answers against shuffled concept names (a derangement of the targets' concepts).
Rates are per latent (its mean over images), intervals are bootstraps over latents, and a
difference from a baseline is a verdict only when its interval excludes 0.

Two settings from the paper: the coarsest matched latents (shallowest concept, then best F1)
on many images, and many latents on one plain white image; each over a dose range of set values
(multiples of the latent's largest observed activation by default).
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from visae.atomic import write_text
from visae.errors import VisaeError
from visae.intervene import Edit, MaxActivations
from visae.intervene.apply import MODES, Editor
from visae.vlm.model import INSTRUCTION, VLM
from visae.vlm.stats import mean_interval, verdict
from visae.vlm.words import first_word, word_forms

NAMEABLE_KINDS = ("object", "class")  # concept kinds a word can name (not count:, position:...)
WHITE = "white"


def nameable(concept: str) -> bool:
    """`object:animals/birds`, `class:goldfish` or a bare label (`goldfish`) name a thing;
    `count:2`, `position:left` or `background:photo` do not."""
    kind, sep, _ = concept.partition(":")
    return not sep or kind in NAMEABLE_KINDS


def concept_path(concept: str) -> str:
    """The concept without its kind: `object:animals/birds` -> `animals/birds`."""
    kind, sep, rest = concept.partition(":")
    return rest if sep and kind in NAMEABLE_KINDS else concept


@dataclass(frozen=True)
class SteerConfig:
    """What `visae steer` runs (defaults: the paper's settings at CPU scale)."""

    values: tuple[float, ...] = (1.0, 3.0, 10.0)
    relative: bool = True  # values are multiples of each latent's max activation
    mode: str = "error"  # error term kept; "replace": Pach's reconstruction replacement
    latents: int = 10  # setting 1: coarsest matched latents ...
    images: int = 20  # ... on this many images
    white_latents: int = 40  # setting 2: latents on one plain white image
    question: str = INSTRUCTION
    max_new_tokens: int = 5
    min_f1: float = 0.0
    batch_size: int = 16
    boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.values or not all(np.isfinite(v) for v in self.values):
            raise VisaeError(f"steering values must be finite numbers, not {self.values}")
        if self.mode not in MODES:
            raise VisaeError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.latents < 1 and self.white_latents < 1:
            raise VisaeError("nothing to steer: latents and white_latents are both 0")
        if self.images < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise VisaeError("images, batch_size and max_new_tokens must be positive")


@dataclass(frozen=True)
class Target:
    latent: int
    concept: str
    f1: float | None = None


@dataclass
class Concepts:
    """Per latent its concept, and for scoring the words that name each concept."""

    by_latent: dict[int, str]
    f1: dict[int, float] = field(default_factory=dict)
    taxonomy: Any = None  # visae.data.taxonomy.Taxonomy of the images, when known
    source: str = ""

    def targets(self, n: int, min_f1: float) -> list[Target]:
        """Up to `n` latents with a nameable concept, coarsest concept first, then best F1, one
        latent per concept."""
        best: dict[str, int] = {}
        for j, c in self.by_latent.items():
            if not nameable(c) or self.f1.get(j, 1.0) < min_f1:
                continue
            if c not in best or self.f1.get(j, 0.0) > self.f1.get(best[c], 0.0):
                best[c] = j
        order = sorted(best, key=lambda c: (c.count("/"), -self.f1.get(best[c], 0.0), c))
        return [Target(best[c], c, self.f1.get(best[c])) for c in order[:n]]

    def words(self, concept: str) -> set[str]:
        """Words that name `concept` exactly: its node's name and every node under it, each in
        singular and plural (`animals/birds` -> birds, bird, crow, crows, ...)."""
        path = concept_path(concept)
        names = {path.rsplit("/", 1)[-1]}
        if self.taxonomy is not None and path in self.taxonomy:
            from visae.vlm.captions import object_phrase

            for item in self.taxonomy.items_under(path):
                node = self.taxonomy.node(item)
                names.add(object_phrase(item, node.caption).split()[-1])
                names.update(a.rsplit("/", 1)[-1] for a in self.taxonomy.ancestors(item))
            names = {n for n in names if n} - {a.rsplit("/", 1)[-1] for a in _above(path)}
        return {form for n in names for form in word_forms(n.lower().replace("_", " "))}

    def name(self, concept: str) -> str:
        return concept_path(concept).rsplit("/", 1)[-1].replace("_", " ")


def _above(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def load_concepts(
    evaluation: str | Path | None = None, analysis: str | Path | None = None, taxonomy: Any = None
) -> Concepts:
    """Latent concepts from an evaluation's matched concepts (preferred) or an analysis's top
    labels."""
    if evaluation is not None:
        path = Path(evaluation) / "latents_trained.csv"
        if not path.is_file():
            raise VisaeError(f"{evaluation} is not an evaluation folder (no latents_trained.csv)")
        with open(path, encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["concept"]]
        return Concepts(
            {int(r["latent"]): r["concept"] for r in rows},
            {int(r["latent"]): float(r["concept_f1"] or 0) for r in rows},
            taxonomy,
            f"matched concepts of {evaluation}",
        )
    if analysis is not None:
        from visae.analysis import Analysis

        table = Analysis.load(analysis).table
        labels = table.get("top_label")
        if labels is None:
            raise VisaeError(f"analysis {analysis} has no top labels (the store had no labels)")
        frac = table.get("top_label_frac")
        by = {j: str(c) for j, c in enumerate(labels) if c}
        f1 = {j: float(frac[j]) for j in by} if frac is not None else {}
        return Concepts(by, f1, taxonomy, f"top labels of {analysis}")
    raise VisaeError("steering needs the latents' concepts: give an evaluation or an analysis")


def check_sae(
    vlm: VLM, sae: Any, tower: Any, layer: int | None = None, weights_hash: str | None = None
) -> int:
    """The tower layer to edit (default: the one the projector reads; an earlier one reaches the
    projector through the blocks after it), refusing an SAE of another model's weights, another
    layer or another input size (`check_pair`)."""
    from visae.intervene.apply import check_pair

    reads = vlm.feature_layer
    layer = reads if layer is None else layer
    if layer > reads:
        raise VisaeError(
            f"layer {layer} is after the layer {vlm.name}'s projector reads ({reads}): "
            "an edit there cannot reach the language model"
        )
    trained = sae.checkpoint_info.get("layer")
    if trained is not None and int(trained) != layer:
        raise VisaeError(
            f"the SAE was trained on layer {trained}, not layer {layer} (the projector of "
            f"{vlm.name} reads layer {reads})"
        )
    return check_pair(tower, sae, layer, weights_hash)


class Steerer:
    """Answers of a VLM with no edit or one latent set to a value on every token."""

    def __init__(
        self,
        vlm: VLM,
        sae: Any,
        config: SteerConfig,
        max_acts: MaxActivations | None,
        layer: int | None = None,
    ) -> None:
        self.vlm, self.sae, self.config = vlm, sae, config
        self.tower = vlm.tower()
        self.hash = self.tower.weights_hash  # hashed once: every edit's check reuses it
        self.layer = check_sae(vlm, sae, self.tower, layer, self.hash)
        if config.relative and max_acts is None:
            raise VisaeError("relative steering values need an analysis (the latents' maxima)")
        self.max_acts = max_acts
        self.generations = 0

    def editor(self, latent: int, value: float) -> Editor:
        edit = Edit((latent,), "set", value, relative=self.config.relative)
        return Editor(
            self.tower,
            self.sae,
            [edit],
            layer=self.layer,
            mode=self.config.mode,
            max_acts=self.max_acts,
            weights_hash=self.hash,
            every_token=True,
        )

    def answers(self, pixels: torch.Tensor, editor: Editor | None = None) -> list[str]:
        out: list[str] = []
        for start in range(0, len(pixels), self.config.batch_size):
            chunk = pixels[start : start + self.config.batch_size]
            if editor is None:
                out += self.vlm.generate(chunk, self.config.question, self.config.max_new_tokens)
            else:
                with self.tower.edit(self.layer, editor):
                    out += self.vlm.generate(
                        chunk, self.config.question, self.config.max_new_tokens
                    )
        self.generations += len(pixels)
        return out


def _score(
    words: list[str], concept: str, concepts: Concepts, encoder: Any
) -> tuple[list[bool], list[float]]:
    accepted = concepts.words(concept)
    match = [w in accepted for w in words]
    sims = encoder.similarity(words, [concepts.name(concept)])[:, 0] if words else np.zeros(0)
    return match, [float(s) for s in sims]


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    if n < 2:
        return np.arange(n)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


@dataclass
class Setting:
    """One setting's rows (one per latent, image and value) and its images."""

    name: str
    targets: list[Target]
    controls: list[int]
    image_ids: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_setting(
    steerer: Steerer,
    setting: Setting,
    images: Sequence[Image.Image],
    concepts: Concepts,
    encoder: Any,
    progress: bool = True,
) -> None:
    """Every (target, value) on the setting's images, plus the unsteered answers and each
    target's random-latent control, into `setting.rows`."""
    cfg = steerer.config
    pixels = steerer.vlm.pixels(list(images))
    before = steerer.answers(pixels)
    jobs = [(t, v) for v in cfg.values for t in range(len(setting.targets))]
    bar = tqdm(jobs, desc=f"steer {setting.name}", disable=not progress, unit="edit")
    for t, value in bar:
        target = setting.targets[t]
        for kind, latent in (("steered", target.latent), ("random", setting.controls[t])):
            after = steerer.answers(pixels, steerer.editor(latent, value))
            words = [first_word(a) for a in after]
            match, sims = _score(words, target.concept, concepts, encoder)
            for i, image_id in enumerate(setting.image_ids):
                setting.rows.append(
                    {
                        "setting": setting.name,
                        "kind": kind,
                        "target": target.latent,
                        "latent": latent,
                        "concept": target.concept,
                        "value": value,
                        "image": image_id,
                        "before": before[i],
                        "after": after[i],
                        "word": words[i],
                        "match": match[i],
                        "similarity": sims[i],
                    }
                )
    words_before = [first_word(a) for a in before]
    for target in setting.targets:
        match, sims = _score(words_before, target.concept, concepts, encoder)
        for i, image_id in enumerate(setting.image_ids):
            setting.rows.append(
                {
                    "setting": setting.name,
                    "kind": "unsteered",
                    "target": target.latent,
                    "latent": "",
                    "concept": target.concept,
                    "value": "",
                    "image": image_id,
                    "before": before[i],
                    "after": before[i],
                    "word": words_before[i],
                    "match": match[i],
                    "similarity": sims[i],
                }
            )


def summarize(
    setting: Setting, concepts: Concepts, encoder: Any, config: SteerConfig
) -> dict[str, Any]:
    """Per value: steered success and similarity beside the three baselines, per latent, with
    bootstrap intervals and verdicts on the paired differences."""
    rng = np.random.default_rng(config.seed)
    targets = [t.latent for t in setting.targets]
    names = [t.concept for t in setting.targets]
    perm = _derangement(len(targets), rng)
    rows = setting.rows

    def per_latent(kind: str, value: Any, key: str) -> np.ndarray:
        out = []
        for j in targets:
            vals = [
                float(r[key])
                for r in rows
                if r["kind"] == kind
                and r["target"] == j
                and (kind == "unsteered" or r["value"] == value)
            ]
            out.append(np.mean(vals))
        return np.asarray(out)

    shuffled_cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for value in config.values:
        match, sim = [], []
        for t, j in enumerate(targets):
            other = names[perm[t]]
            words = [
                r["word"]
                for r in rows
                if r["kind"] == "steered" and r["target"] == j and r["value"] == value
            ]
            m, s = _score(words, other, concepts, encoder)
            match.append(np.mean(m))
            sim.append(np.mean(s))
        shuffled_cache[value] = (np.asarray(match), np.asarray(sim))

    doses = []
    for value in config.values:
        entry: dict[str, Any] = {"value": value}
        for metric, key, idx in (("success", "match", 0), ("similarity", "similarity", 1)):
            steered = per_latent("steered", value, key)
            baselines = {
                "unsteered": per_latent("unsteered", None, key),
                "random_latent": per_latent("random", value, key),
                "shuffled_names": shuffled_cache[value][idx],
            }
            block: dict[str, Any] = {"steered": mean_interval(steered, config.boot, rng)}
            for name, base in baselines.items():
                diff = mean_interval(steered - base, config.boot, rng)
                block[name] = mean_interval(base, config.boot, rng)
                block[f"minus_{name}"] = diff | {"verdict": verdict(diff)}
            entry[metric] = block
        doses.append(entry)
    return {
        "setting": setting.name,
        "targets": [asdict(t) for t in setting.targets],
        "controls": setting.controls,
        "shuffled_concepts": [names[p] for p in perm],
        "images": setting.image_ids,
        "doses": doses,
        "per_latent": latent_table(setting, config.values),
    }


def latent_table(setting: Setting, values: Sequence[float]) -> list[dict[str, Any]]:
    """Per target latent and value: its success rate over the images and the words it made
    the model say most (the aggregate's intervals hide which latents steer)."""
    out = []
    for t in setting.targets:
        for value in values:
            rows = [
                r
                for r in setting.rows
                if r["kind"] == "steered" and r["target"] == t.latent and r["value"] == value
            ]
            words = Counter(r["word"] for r in rows).most_common(3)
            out.append(
                {
                    "latent": t.latent,
                    "concept": t.concept,
                    "value": value,
                    "success": float(np.mean([bool(r["match"]) for r in rows])) if rows else None,
                    "words": [[w, n] for w, n in words],
                }
            )
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """`answers.csv` back as rows of the types `run_setting` wrote."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["target"] = int(r["target"])
        r["value"] = float(r["value"]) if r["value"] else ""
        r["match"] = r["match"] == "True"
        r["similarity"] = float(r["similarity"])
    return rows


def resummarize(out: str | Path, concepts: Concepts, encoder: Any) -> dict[str, Any]:
    """A finished run's `steer.json` recomputed from its `answers.csv` (with this code's
    summary), without generating again; written back in place."""
    out = Path(out)
    result = json.loads((out / "steer.json").read_text(encoding="utf-8"))
    config = SteerConfig(**(result["config"] | {"values": tuple(result["config"]["values"])}))
    rows = read_rows(out / "answers.csv")
    summaries = []
    for s in result["settings"]:
        setting = Setting(
            s["setting"],
            [Target(t["latent"], t["concept"], t.get("f1")) for t in s["targets"]],
            list(s["controls"]),
            list(s["images"]),
            [r for r in rows if r["setting"] == s["setting"]],
        )
        summaries.append(summarize(setting, concepts, encoder, config))
    result["settings"] = summaries
    write_text(out / "steer.json", json.dumps(result, indent=2) + "\n")
    return result


def white_image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 255, 255))


def _controls(targets: list[Target], live: np.ndarray, rng: np.random.Generator) -> list[int]:
    taken = {t.latent for t in targets}
    pool = np.asarray([j for j in np.flatnonzero(live) if j not in taken])
    if len(pool) == 0:
        raise VisaeError("no live latent is left for the random-latent baseline")
    return [int(x) for x in rng.choice(pool, size=len(targets), replace=len(pool) < len(targets))]


def steer(
    vlm: VLM,
    sae: Any,
    concepts: Concepts,
    images: Sequence[Image.Image],
    image_ids: Sequence[str],
    out: str | Path,
    *,
    config: SteerConfig = SteerConfig(),
    analysis: str | Path | None = None,
    encoder: Any = None,
    layer: int | None = None,
    sae_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Both settings (module docstring); writes `steer.json`, `answers.csv` and `report.html`
    to `out` and returns the summary."""
    from visae.text import packaged_encoder
    from visae.vlm.report import write_report

    started = time.perf_counter()
    if len(images) != len(image_ids):
        raise VisaeError(f"{len(images)} images but {len(image_ids)} image ids")
    encoder = encoder or packaged_encoder()
    max_acts = MaxActivations.from_analysis(analysis) if analysis is not None else None
    steerer = Steerer(vlm, sae, config, max_acts, layer)
    rng = np.random.default_rng(config.seed)
    live = max_acts.patch > 0 if max_acts is not None else np.ones(sae.n_latents, dtype=bool)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings: list[tuple[Setting, list[Image.Image]]] = []
    if config.latents and len(images):
        targets = concepts.targets(config.latents, config.min_f1)
        if targets:
            chosen = sorted(rng.choice(len(images), min(config.images, len(images)), replace=False))
            settings.append(
                (
                    Setting(
                        "coarsest",
                        targets,
                        _controls(targets, live, rng),
                        [str(image_ids[i]) for i in chosen],
                    ),
                    [images[i] for i in chosen],
                )
            )
    if config.white_latents:
        targets = concepts.targets(config.white_latents, config.min_f1)
        if targets:
            size = vlm.preprocessor.output_hw[0]
            settings.append(
                (
                    Setting(WHITE, targets, _controls(targets, live, rng), [WHITE]),
                    [white_image(size)],
                )
            )
    if not settings:
        raise VisaeError(
            f"no latent has a concept a word can name ({concepts.source}); steering needs "
            "object or class concepts such as object:animals/birds"
        )
    for setting, imgs in settings:
        for t in setting.targets:
            if t.latent >= sae.n_latents:
                raise VisaeError(f"latent {t.latent} is out of range 0..{sae.n_latents - 1}")
        run_setting(steerer, setting, imgs, concepts, encoder, progress)
    result = {
        "vlm": vlm.name,
        "layer": steerer.layer,
        "sae": sae_name,
        "concepts": concepts.source,
        "encoder": getattr(encoder, "name", ""),
        "config": asdict(config),
        "settings": [summarize(s, concepts, encoder, config) for s, _ in settings],
        "generations": steerer.generations,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_rows(out / "answers.csv", [r for s, _ in settings for r in s.rows])
    write_text(out / "steer.json", json.dumps(result, indent=2) + "\n")
    pictures = {i: im for s, ims in settings for i, im in zip(s.image_ids, ims, strict=True)}
    write_report(out, result, [s for s, _ in settings], pictures, analysis)
    return result


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
