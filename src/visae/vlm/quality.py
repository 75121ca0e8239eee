"""How well a VLM names what a concept scene shows: the first word of its one-word answer
against the scene's objects at every taxonomy level ("crow", "bird" and "animal" all name a crow),
exactly or as a synonym (cosine similarity under the sentence encoder at or above a threshold to
one of those names), beside two constant answers: the most frequent answer of the training set
(the most-frequent-answer baseline) and the best single word in hindsight (an upper bound on any
constant). Rates come with 95% bootstrap intervals over images and paired differences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from visae.data.scene_dataset import SceneDataset
from visae.vlm.captions import object_phrase, one_word_answer
from visae.vlm.model import INSTRUCTION, VLM
from visae.vlm.stats import mean_interval
from visae.vlm.words import first_word, word_forms

SYNONYM_THRESHOLD = 0.7


def object_names(scenes: SceneDataset, image: int) -> set[str]:
    """Every word that names one of the image's objects: its one-word name, the words of its
    phrase, its item name and each taxonomy level above it, singular and plural."""
    names: set[str] = set()
    for obj in scenes.records[image]["objects"]:
        item = obj["item"]
        phrase = object_phrase(item, scenes.taxonomy.node(item).caption)
        names.update(phrase.split()[1:])
        for path in scenes.taxonomy.ancestors(item):
            names.update(
                path.rsplit("/", 1)[-1].lower().replace("_", " ").replace("-", " ").split()
            )
    return {form for n in names if len(n) > 2 for form in word_forms(n)}


def answers(
    vlm: VLM, images: Sequence[Any], batch_size: int = 16, progress: bool = True
) -> list[str]:
    out: list[str] = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="answers", disable=not progress, unit="batch"
    ):
        out += vlm.generate(vlm.pixels(list(images[start : start + batch_size])), INSTRUCTION)
    return out


def score_words(
    words: Sequence[str],
    names: Sequence[set[str]],
    encoder: Any,
    threshold: float = SYNONYM_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """(exact, exact-or-synonym) hits per image."""
    exact = np.asarray([w in n for w, n in zip(words, names, strict=True)])
    synonym = exact.copy()
    for i, (w, n) in enumerate(zip(words, names, strict=True)):
        if not exact[i] and w and n:
            synonym[i] = float(encoder.similarity([w], sorted(n)).max()) >= threshold
    return exact, synonym


def measure_quality(
    vlm: VLM,
    scenes: SceneDataset,
    training: SceneDataset,
    encoder: Any,
    *,
    threshold: float = SYNONYM_THRESHOLD,
    boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The model's hit rates on `scenes` beside the constant-answer baselines (module
    docstring); `training`: the projector's training scenes (for the most frequent answer)."""
    rng = np.random.default_rng(seed)
    n = len(scenes)
    names = [object_names(scenes, i) for i in range(n)]
    said = answers(vlm, [scenes.image(i) for i in range(n)], progress=progress)
    words = [first_word(a) for a in said]
    frequent = Counter(one_word_answer(training, i) for i in range(len(training))).most_common(1)[
        0
    ][0]
    candidates = sorted({w for s in names for w in s})
    best = max(candidates, key=lambda w: (sum(w in s for s in names), w))
    rows = {"model": words, "most_frequent_answer": [frequent] * n, "best_constant": [best] * n}
    scored = {k: score_words(v, names, encoder, threshold) for k, v in rows.items()}
    result: dict[str, Any] = {
        "images": n,
        "threshold": threshold,
        "most_frequent_answer": frequent,
        "best_constant": best,
        "distinct_answers": len(set(words)),
        "top_answers": Counter(words).most_common(10),
        "examples": [
            {"answer": said[i], "objects": [o["item"] for o in scenes.records[i]["objects"]]}
            for i in range(min(n, 12))
        ],
    }
    for metric, idx in (("exact", 0), ("synonym", 1)):
        model = scored["model"][idx].astype(float)
        block: dict[str, Any] = {"model": mean_interval(model, boot, rng)}
        for base in ("most_frequent_answer", "best_constant"):
            other = scored[base][idx].astype(float)
            block[base] = mean_interval(other, boot, rng)
            block[f"model_minus_{base}"] = mean_interval(model - other, boot, rng)
        result[metric] = block
    return result
