"""Shuffled store reader throughput against what the trainer consumes.

Target: the shuffled reader (patch tokens, batch 4096, a float16 store of DINOv2-S shape:
1 CLS + 16x16 patches, d=384) delivers at least 20x the tokens/s of one TopK SAE training step
(d=384, 6144 latents, k=32, Adam, batch 4096) in the same run, so the reader is never what a
sweep waits for. Shown beside it: the reader with blocks of consecutive images (I/O locality,
at some cost to the uniformity of batches) and a plain sequential read of every shard to
float32 (the copy the reader cannot beat). The store is read once before timing, so every
figure is from the page cache: the reader's own cost, not the disk's.

    .venv/bin/python benchmarks/bench_reader.py            # ~1 GB store; updates RESULTS.md
    .venv/bin/python benchmarks/bench_reader.py --quick --no-write   # a check that it runs
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_note, report, write_section

from visae.sae import SAE, SAEConfig, normalization_from_sample
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter

SECTION = "bench_reader"
TARGET = 20.0


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
    """Baseline: read every shard file in order into memory, convert to float32 (with torch,
    as the reader does)."""
    files = [store.path / f"layer_00/shard_{s:05d}.npy" for s in range(store.n_shards)]
    t0 = time.perf_counter()
    tokens = 0
    for f in files:
        out = torch.from_numpy(np.load(f)).float()
        tokens += out.shape[0] * out.shape[1]
    return tokens, time.perf_counter() - t0


def shuffled(
    store: ActivationStore, batch: int, seed: int, prefetch: int, block: int, limit: int
) -> tuple[int, float]:
    """Tokens and seconds of the first `limit` tokens of an epoch."""
    t0 = time.perf_counter()
    tokens = 0
    for b in store.shuffled(
        0, "patch", batch_size=batch, seed=seed, prefetch=prefetch, block_images=block
    ):
        tokens += b.shape[0]
        if tokens >= limit:
            break
    return tokens, time.perf_counter() - t0


def sae_step_rate(store: ActivationStore, batch: int, steps: int) -> float:
    """Tokens/s of TopK SAE training steps on batches of the store (read beforehand)."""
    torch.manual_seed(0)
    sae = SAE.create(SAEConfig(arch="topk", d=store.d(0), n_latents=6144, k=32))
    mean, scale = normalization_from_sample(store.sample_tokens(0, "patch", 16384, seed=1))
    sae.set_normalization(mean, scale)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    stream = store.shuffled(0, "patch", batch_size=batch, prefetch=0)
    batches = [torch.from_numpy(b) for b in itertools.islice(stream, 3)]
    for i in range(2):  # warm-up: allocator, threads, first-touch
        sae.train_step(opt, batches[i % len(batches)])
    t0 = time.perf_counter()
    for i in range(steps):
        sae.train_step(opt, batches[i % len(batches)])
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--grid", type=int, default=16, help="patch grid side (tokens = 1 + grid^2)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shard-images", type=int, default=256)
    ap.add_argument("--block", type=int, default=16, help="block size of the locality variant")
    ap.add_argument("--steps", type=int, default=10, help="SAE steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.images, args.steps, args.repeats, args.shard_images = 120, 2, 1, 32

    note = load_note()
    with tempfile.TemporaryDirectory(prefix="visae-bench-reader-") as tmp:
        path = Path(tmp) / "store"
        build_store(path, args.images, args.grid, args.d, args.shard_images)
        store = ActivationStore.open(path, verify=True, progress=False)
        sequential(store)  # warm the page cache
        epoch = store.n_tokens(0, "patch")
        limit = min(epoch, 50 * args.batch)
        # interleaved repeats, best of each: every side sees the same machine load
        seq_runs: list[tuple[int, float]] = []
        variants = {(1, 0): [], (1, 2): [], (args.block, 0): []}
        sae_rates: list[float] = []
        for rep in range(args.repeats):
            seq_runs.append(sequential(store))
            for (block, prefetch), runs in variants.items():
                runs.append(shuffled(store, args.batch, rep, prefetch, block, limit))
            sae_rates.append(sae_step_rate(store, args.batch, args.steps))
        seq = min(seq_runs, key=lambda r: r[1])
        rates = {k: max(n / t for n, t in runs) for k, runs in variants.items()}
        size = store.size_bytes()

    sae_rate = max(sae_rates)
    reader = rates[(1, 0)]  # inline: the reader's cost alone, no thread overlapping it
    ratio = reader / sae_rate
    verdict = "meets" if ratio >= TARGET else "MISSES"
    lines = [
        note,
        f"store: {args.images} images x {1 + args.grid**2} tokens x d={args.d}, float16, "
        f"shards of {args.shard_images} images, {size / 2**20:.0f} MiB (page cache)",
        f"TopK SAE train step (6144 latents, k=32, Adam, batch {args.batch}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"{sae_rate / 1e3:9.1f} k tokens/s",
        f"shuffled reader, patch, batch {args.batch}, prefetch 0:        "
        f"{reader / 1e6:8.2f} M tokens/s",
        f"shuffled reader, patch, batch {args.batch}, prefetch 2:        "
        f"{rates[(1, 2)] / 1e6:8.2f} M tokens/s",
        f"shuffled reader, blocks of {args.block} images, prefetch 0:     "
        f"{rates[(args.block, 0)] / 1e6:8.2f} M tokens/s",
        f"sequential read of every shard + float32:     {seq[0] / seq[1] / 1e6:8.2f} M tokens/s",
        f"reader / trainer: {ratio:.1f}x  ({verdict} the >= {TARGET:.0f}x target)",
    ]
    print("\n".join(lines))
    if not args.no_write:
        cmd = "python benchmarks/bench_reader.py " + " ".join(sys.argv[1:])
        section = report(
            "Store reader: shuffled stream vs the trainer's consumption (bench_reader.py)",
            cmd.strip(),
            lines,
            detail=f"(best of {args.repeats}, interleaved; reader timed on the first "
            f"{limit // args.batch} batches of an epoch)",
            after=[
                "Every batch of the shuffled reader is a uniform draw over the store (a "
                "per-epoch permutation of its images, read window by window); blocks of "
                "consecutive images trade some of that uniformity for longer reads."
            ],
        )
        write_section(SECTION, section)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
