"""How well the packaged tiny VLM names what held-out concept scenes show, against the
most-frequent-answer baseline (and the best constant word in hindsight), beside the same parts
with an untrained projector.

Held-out scenes: 300 scenes rendered with seed 102 (the projector trained on seed 101's). A hit:
the first word of the one-word answer names one of the scene's objects at any taxonomy level,
exactly or (synonym) at cosine >= 0.7 under all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/bench_vlm_quality.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interval, load_note, report, write_section

from visae.data import SceneConfig
from visae.data.default import cached_scenes
from visae.text import packaged_encoder
from visae.vlm.build import BuildConfig
from visae.vlm.packaged import DEFAULT_PROJECTOR, packaged_vlm
from visae.vlm.quality import measure_quality

SECTION = "bench_vlm_quality"
AFTER = (
    "The exact hit rate is the measure: the model names one of the objects more often than the "
    "most frequent training answer does, by a margin whose interval excludes 0. It stays below "
    "the best constant word in hindsight ('animals': most scenes hold an animal), which no "
    "answer is trained towards. The synonym rate cannot separate the model from the constant: "
    "at cosine >= 0.7 MiniLM makes 'mammal' a synonym of 'animal', which names most scenes, so "
    "the constant answer gains as much as the model does."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    note = load_note()
    held_out = cached_scenes(
        SceneConfig(n_scenes=args.scenes, size=224, seed=102, pairs_per_kind=0)
    )
    training = cached_scenes(BuildConfig().scene_config())
    encoder = packaged_encoder()
    block, started = [], time.perf_counter()
    for name, projector in (
        ("trained projector", DEFAULT_PROJECTOR),
        ("untrained projector", None),
    ):
        t = time.perf_counter()
        vlm = packaged_vlm(projector)
        q = measure_quality(vlm, held_out, training, encoder)
        seconds = time.perf_counter() - t
        block.append(f"{name} ({q['images']} held-out scenes, {seconds:.0f} s):")
        for metric in ("exact", "synonym"):
            m = q[metric]
            block.append(
                f"  {metric:<7} hit rate {interval(m['model'])}   most-frequent answer "
                f"'{q['most_frequent_answer']}' {interval(m['most_frequent_answer'])}   "
                f"best constant '{q['best_constant']}' {interval(m['best_constant'])}"
            )
            block.append(
                f"          model - most-frequent {interval(m['model_minus_most_frequent_answer'])}"
                f"   model - best constant {interval(m['model_minus_best_constant'])}"
            )
        top = ", ".join(f"{w} {c}" for w, c in q["top_answers"][:8])
        block.append(f"  {q['distinct_answers']} distinct first words; most said: {top}")
        print("\n".join(block[-6:]), flush=True)
    total = time.perf_counter() - started
    if args.no_write:
        return
    write_section(
        SECTION,
        report(
            "Packaged VLM: one-word answers on held-out scenes (bench_vlm_quality.py)",
            "python benchmarks/bench_vlm_quality.py",
            block,
            detail=f"({total:.0f} s; {note})",
            before=[
                "Question: 'What is shown in this image? Use exactly one word!', greedy, 5 new "
                "tokens, first word. Hit: the word names one of the scene's objects at any "
                "taxonomy level (crow, bird, animal), exactly or as a synonym (MiniLM cosine "
                ">= 0.7). Intervals: 95% bootstrap over images; differences are paired. "
                "Projector: the committed default (visae vlm build)."
            ],
            after=[AFTER],
        ),
    )


if __name__ == "__main__":
    main()
