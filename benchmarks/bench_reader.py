"""Shuffled store reader throughput vs a plain sequential read of the same shards.

Target: the shuffled reader (patch tokens, batch 4096, float16 store, d=384) delivers at
least 50% of the tokens/s of reading every shard in order and converting it to float32.
Both read from the page cache (the store is read once before timing), so the figure is the
reader's own cost, not the disk's.

    .venv/bin/python benchmarks/bench_reader.py            # prints and updates RESULTS.md
    .venv/bin/python benchmarks/bench_reader.py --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report, write_section

from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter

SECTION = "bench_reader"
TARGET = 0.5


def build_store(path: Path, n_images: int, grid: int, d: int, shard_images: int) -> None:
    spec = StoreSpec(
        backbone={"name": "synthetic", "weights_hash": "none", "preprocessing": {}},
        dataset={"name": "synthetic", "fingerprint": f"{n_images}x{grid}x{d}"},
        layers=[LayerSpec(0, d, {"n_cls": 1, "n_registers": 0, "grid": [grid, grid]})],
        dtype="float16",
        shard_images=shard_images,
    )
    rng = np.random.default_rng(0)
    n_tok = 1 + grid * grid
    with StoreWriter(path, spec) as writer:
        for lo in range(0, n_images, shard_images):
            n = min(shard_images, n_images - lo)
            data = rng.standard_normal((n, n_tok, d), dtype=np.float32)
            writer.append_shard({0: data}, [{"source": f"synthetic/{lo + i}"} for i in range(n)])
        writer.finish()


def sequential(store: ActivationStore) -> tuple[int, float]:
    """Baseline: read every shard file in order into memory, convert to float32."""
    files = [store.path / f"layer_00/shard_{s:05d}.npy" for s in range(store.n_shards)]
    t0 = time.perf_counter()
    tokens = 0
    for f in files:
        out = np.load(f).astype(np.float32)
        tokens += out.shape[0] * out.shape[1]
    return tokens, time.perf_counter() - t0


def shuffled(store: ActivationStore, batch: int, seed: int, prefetch: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = 0
    for b in store.shuffled(0, "patch", batch_size=batch, seed=seed, prefetch=prefetch):
        tokens += b.shape[0]
    return tokens, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--grid", type=int, default=16, help="patch grid side (tokens = 1 + grid^2)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shard-images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="visae-bench-reader-") as tmp:
        path = Path(tmp) / "store"
        build_store(path, args.images, args.grid, args.d, args.shard_images)
        store = ActivationStore.open(path, verify=True, progress=False)
        sequential(store)  # warm the page cache
        # interleaved repeats, best of each: both sides see the same machine load
        seq_runs: list[tuple[int, float]] = []
        shuf_runs: dict[int, list[tuple[int, float]]] = {0: [], 2: []}
        for rep in range(args.repeats):
            seq_runs.append(sequential(store))
            for prefetch in shuf_runs:
                shuf_runs[prefetch].append(shuffled(store, args.batch, rep, prefetch))
        seq = min(seq_runs, key=lambda r: r[1])
        runs = {p: min(r, key=lambda r: r[1]) for p, r in shuf_runs.items()}
        size = store.size_bytes()

    seq_rate = seq[0] / seq[1]
    rates = {p: n / t for p, (n, t) in runs.items()}
    best = max(rates.values())
    ratio = best / seq_rate
    verdict = "meets" if ratio >= TARGET else "MISSES"
    load = os.getloadavg()[0]
    lines = [
        f"load average before the run: {load_before:.2f}, after: {load:.2f} "
        f"({os.cpu_count()} cores; other work on the machine slows both sides)",
        f"store: {args.images} images x {1 + args.grid**2} tokens x d={args.d}, float16, "
        f"shards of {args.shard_images} images, {size / 2**20:.0f} MiB (page cache)",
        f"sequential read + float32 (all tokens):  {seq_rate / 1e6:8.2f} M tokens/s",
        f"shuffled, patch, batch {args.batch}, prefetch 0:  {rates[0] / 1e6:8.2f} M tokens/s",
        f"shuffled, patch, batch {args.batch}, prefetch 2:  {rates[2] / 1e6:8.2f} M tokens/s",
        f"ratio (best shuffled / sequential): {ratio:.2f}  ({verdict} the {TARGET:.0%} target)",
    ]
    print("\n".join(lines))
    if not args.no_write:
        cmd = "python benchmarks/bench_reader.py " + " ".join(sys.argv[1:])
        section = report(
            "Store reader: shuffled vs sequential (bench_reader.py)",
            cmd.strip(),
            lines,
            detail=f"(best of {args.repeats})",
        )
        write_section(SECTION, section)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
