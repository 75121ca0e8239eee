"""Wall time of `visae evaluate` on the demo's SAE, every score and both baselines, from an
empty cache.

Target (issue 10): under 3 minutes on this machine. The demo's artifacts (store and SAE) are
made by `visae demo --out DIR` (reused when present); the evaluation runs into a fresh folder,
so every code pass and the encoder's embeddings are computed, as on a user's first run. A second
run into the same folder shows what the cache saves.

    .venv/bin/python benchmarks/bench_eval_time.py --demo-out demo-out
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.cli import main as visae_main
from visae.eval import evaluate

SECTION = "bench_eval_time"
SAE = Path("runs/topk-k32/sae")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-out", type=Path, default=Path("demo-out"))
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    demo = args.demo_out
    if not (demo / SAE / "config.json").is_file():
        assert visae_main(["demo", "--out", str(demo), "--quiet"]) == 0
    note = load_note()
    work = Path(tempfile.mkdtemp(prefix="bench-eval-time-"))
    try:
        start = time.perf_counter()
        ev = evaluate(demo / SAE, demo / "store", work / "eval", progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = evaluate(demo / SAE, demo / "store", work / "eval", progress=False)
        second = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    inputs = ev.scores["inputs"]
    block = [
        f"SAE: {inputs['sae']['arch']}, {inputs['sae']['n_latents']} latents, k "
        f"{inputs['sae']['k']}, {inputs['sae']['tokens']} tokens of layer {inputs['sae']['layer']}",
        f"images: {inputs['images']['n']} scored ({inputs['images']['patch_level']} at patch "
        f"level), {inputs['store']['n_images']} in the store; {inputs['concepts']['n_scored']} "
        f"concepts, {inputs['pairs']['n_pairs']} pairs; E = {inputs['encoder']['name']}",
        f"scores: {len(ev.scores['scores'])}, each for trained / frozen / random",
        "",
        f"first run (empty cache):  {first:6.1f} s  (target < 180 s: "
        f"{'met' if first < 180 else 'NOT met'})",
        *(f"  {stage:<24} {sec:6.1f} s" for stage, sec in ev.scores["timings"].items()),
        f"second run (cached codes and embeddings): {second:6.1f} s",
        *(f"  {stage:<24} {sec:6.1f} s" for stage, sec in again.scores["timings"].items()),
        "",
        note,
    ]
    print("\n".join(block))
    if not args.no_write:
        write_section(
            SECTION,
            report(
                "visae evaluate of the demo SAE: wall time (bench_eval_time.py)",
                "python benchmarks/bench_eval_time.py --demo-out demo-out",
                block,
                before=[
                    "Every score with both baselines (untrained twin, random codes) and MS's "
                    "encoder embeddings, from an empty cache; the store and SAE are those of "
                    "`visae demo`."
                ],
            ),
        )


if __name__ == "__main__":
    main()
