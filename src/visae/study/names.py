"""The free-text names participants give, scored against what the feature is known to stand for:
its concept label (the evaluation's matched concept, else the analysis's top label), by the
cosine of the two in the sentence encoder all-MiniLM-L6-v2 (`visae.text`).

A cosine alone has no zero: names and labels share vocabulary whatever the feature. So each
name is also compared with the label of another feature of the same SAE (a seeded
derangement), and the paired difference, own label minus other label, is the score: 0 when
names say nothing about their feature.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from visae.study.scoring import aggregate


def label_text(label: str) -> str:
    """`object:animals/birds` -> `birds`: the words a person could have written."""
    _, sep, rest = label.partition(":")
    return (rest if sep else label).rsplit("/", 1)[-1].replace("_", " ").strip()


def feature_labels(analysis: Any) -> list[str | None]:
    concepts = analysis.texts.get("concept")
    top = analysis.table.get("top_label")
    out: list[str | None] = []
    for j in range(analysis.n_latents):
        label = (concepts[j] if concepts else None) or (str(top[j]) if top is not None else "")
        out.append(label_text(label) or None)
    return out


def name_scores(
    trials: list[tuple[str, int, str, str]],
    analyses: dict[str, Any],
    encoder: Any,
    seed: int = 0,
    boot: int = 2000,
) -> list[dict[str, Any]]:
    """Per SAE: the mean cosine of names to their feature's label, to another feature's label,
    and their paired difference, each with its two-level interval. `trials`: (sae, latent,
    participant, name) of the scored naming trials."""
    out = []
    rng = np.random.default_rng(seed)
    for sae, analysis in analyses.items():
        labels = feature_labels(analysis)
        mine = [t for t in trials if t[0] == sae and labels[t[1]]]
        latents = sorted({t[1] for t in mine})
        if len(latents) < 2:
            continue
        other = dict(zip(latents, _derangement(latents, rng), strict=True))
        names = [t[3] for t in mine]
        own = [labels[t[1]] for t in mine]
        shuffled = [labels[other[t[1]]] for t in mine]
        vocab = sorted(set(own) | set(shuffled))
        sim = encoder.similarity(names, vocab)
        col = {v: k for k, v in enumerate(vocab)}
        rows = np.arange(len(mine))
        s_own = sim[rows, [col[v] for v in own]]
        s_other = sim[rows, [col[v] for v in shuffled]]
        people = [t[2] for t in mine]
        features = [str(t[1]) for t in mine]
        result = {"sae": sae, "n_names": len(mine)}
        for key, values in (
            ("own_label", s_own),
            ("other_label", s_other),
            ("difference", s_own - s_other),
        ):
            iv = aggregate(values, people, features, boot=boot, seed=seed)
            result[key] = {"mean": iv.mean, "lo": iv.lo, "hi": iv.hi}
        d = result["difference"]
        result["verdict"] = (
            "names match their features' labels"
            if d["lo"] > 0
            else "cannot be told from names of other features"
        )
        out.append(result)
    return out


def _derangement(items: list[int], rng: np.random.Generator) -> list[int]:
    """A seeded shuffle of `items` in which no item stays in place (len >= 2)."""
    n = len(items)
    while True:
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return [items[int(k)] for k in order]
