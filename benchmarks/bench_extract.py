"""Extraction overhead: `visae.store.extract` vs the bare backbone forward on the same images.

Both sides read the same images, preprocess them and run the same batches through the real
DINOv2-S; only extract also converts to float16, checks finiteness and writes shards, metadata
and the manifest. Target: overhead <= 5%.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.backbones import DEFAULT_BACKBONE, load_backbone
from visae.data import load_dataset
from visae.store import extract

TARGET = 0.05


def bare_forward(backbone, dataset, layers: list[int], batch_size: int) -> float:
    """Seconds to load, preprocess and record every image, keeping nothing."""
    start = time.perf_counter()
    for lo in range(0, len(dataset), batch_size):
        images = [dataset.image(i) for i in range(lo, min(lo + batch_size, len(dataset)))]
        _ = [dataset.metadata(i) for i in range(lo, min(lo + batch_size, len(dataset)))]
        backbone.record(backbone.preprocess(images), layers)
    return time.perf_counter() - start


def with_store(backbone, dataset, layers: list[int], batch_size: int, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    extract(backbone, dataset, out, layers=layers, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes#256")
    ap.add_argument("--layers", default="10")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    torch.manual_seed(0)
    backbone = load_backbone(DEFAULT_BACKBONE)
    dataset = load_dataset(args.dataset)
    layers = [int(x) for x in args.layers.split(",")]
    note = load_note()
    bare_forward(backbone, dataset, layers, args.batch_size)  # warm caches and threads
    bare, stored = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, best of each
            bare.append(bare_forward(backbone, dataset, layers, args.batch_size))
            stored.append(with_store(backbone, dataset, layers, args.batch_size, Path(tmp) / "s"))
    n = len(dataset)
    overhead = min(stored) / min(bare) - 1
    verdict = "meets" if overhead <= TARGET else "misses"
    text = report(
        "Extraction overhead: store writing vs bare forward (bench_extract.py)",
        f"python benchmarks/bench_extract.py --dataset '{args.dataset}' --layers {args.layers}",
        [
            note,
            f"{n} images, {DEFAULT_BACKBONE}, layers {layers}, batch {args.batch_size}, float16",
            f"bare forward (load + preprocess + record): {n / min(bare):7.1f} images/s",
            f"extract to a store:                        {n / min(stored):7.1f} images/s",
            f"overhead: {overhead * 100:+.1f}%  ({verdict} the <= {TARGET * 100:.0f}% target)",
        ],
        detail=f"(best of {args.repeats}, interleaved)",
    )
    print(text)
    if not args.no_write:
        write_section("bench_extract", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
