"""Scene rendering speed: target >= 100 scenes/s at 224 px on the 2-core machine.

Measures (best of --repeats, same process, same machine):
  - render only: specs sampled and pixels + label maps composited in memory, one process;
  - full generation: images, masks, tables and COCO export written to a folder, with 1 and with
    2 worker processes (the default is one per core).
The named baseline is the target rate itself: each figure is printed as a ratio to 100 scenes/s.
Counts include the pair images (an edited scene costs about as much as a base scene).

    .venv/bin/python benchmarks/bench_scenes.py            # prints and updates RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report, write_section

from visae.data.scenes import SceneConfig, SceneGenerator, generate_scenes

SECTION = "bench_scenes"
TARGET = 100.0


def render_only(gen: SceneGenerator) -> float:
    start = time.perf_counter()
    for i in range(gen.config.n_images):
        gen.scene(i)
    return gen.config.n_images / (time.perf_counter() - start)


def full(gen: SceneGenerator, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scenes"
        start = time.perf_counter()
        generate_scenes(gen.config, out, workers=workers, progress=False, generator=gen)
        rate = gen.config.n_images / (time.perf_counter() - start)
        shutil.rmtree(out)
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--pairs-per-kind", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--objects", default="stamps", choices=["stamps", "shapes"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    config = SceneConfig(
        n_scenes=args.scenes,
        size=args.size,
        seed=0,
        objects=args.objects,
        pairs_per_kind=args.pairs_per_kind,
    )
    start = time.perf_counter()
    gen = SceneGenerator(config)
    setup = time.perf_counter() - start
    load = os.getloadavg()[0]
    rates = {
        "render only, 1 process": max(render_only(gen) for _ in range(args.repeats)),
        "full generation, 1 worker": max(full(gen, 1) for _ in range(args.repeats)),
        "full generation, 2 workers": max(full(gen, 2) for _ in range(args.repeats)),
    }
    lines = [
        f"{config.n_images} images ({config.n_scenes} scenes + {config.n_images - config.n_scenes} "
        f"pair images), {config.size} px, objects: {gen.stamps.name} ({len(gen.stamps)} items)",
        f"set-up (load stamps and background photos, once per process): {setup:.1f} s",
        f"load average when started: {load:.2f}",
    ]
    for name, rate in rates.items():
        lines.append(f"{name + ':':<30} {rate:7.0f} scenes/s   ({rate / TARGET:.2f} x target)")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        section = report(
            "Scene rendering (bench_scenes.py)",
            " ".join(["python benchmarks/bench_scenes.py", *sys.argv[1:]]),
            lines,
            detail=f"(best of {args.repeats}; target {TARGET:.0f} scenes/s at 224 px)",
        )
        write_section(SECTION, section)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
