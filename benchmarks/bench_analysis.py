"""Analysis pass throughput vs the SAE's bare encode over the same tokens.

Target (issue 5, made precise in issue 9): the analysis pass runs at least at the SAE's encode
speed, i.e. the statistics, streaming top-N lists, patch maps and per-patch codes add little
over encoding. Baseline: `sae.encode_sparse`, the encoder call the pass itself makes, over
exactly the tokens the pass encodes (every patch token and the CLS token of every image, the
SAE being trained on both), read from the same store in calls of the same size, in the same
run. Also shown: `sae.encode` (dense codes), and the full `run_analysis` (pass + thumbnails +
writing the artifact).

    .venv/bin/python benchmarks/bench_analysis.py            # prints and updates RESULTS.md
    .venv/bin/python benchmarks/bench_analysis.py --no-write --images 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report, write_section

from visae.analysis import AnalysisConfig, run_analysis, stream_pass
from visae.sae import SAE, SAEConfig
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter

SECTION = "bench_analysis"
LAYER = 0


class NoiseImages:
    """A stand-in dataset for thumbnails: one seeded noise image per store image."""

    name = "noise"

    def __init__(self, n: int) -> None:
        self.n = n
        self.fingerprint = f"noise-{n}"

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> Image.Image:
        rng = np.random.default_rng(i)
        return Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))

    def metadata(self, i: int) -> dict:
        return {"source": f"noise/{i}"}


def build_store(path: Path, n_images: int, grid: int, d: int) -> None:
    spec = StoreSpec(
        backbone={"name": "synthetic", "weights_hash": "none", "preprocessing": {}},
        dataset={"name": "noise", "fingerprint": f"noise-{n_images}"},
        layers=[LayerSpec(LAYER, d, {"n_cls": 1, "n_registers": 0, "grid": [grid, grid]})],
        dtype="float16",
        shard_images=256,
    )
    rng = np.random.default_rng(0)
    with StoreWriter(path, spec) as writer:
        for lo in range(0, n_images, 256):
            n = min(256, n_images - lo)
            data = rng.standard_normal((n, 1 + grid * grid, d), dtype=np.float32)
            writer.append_shard({LAYER: data}, [{"source": f"noise/{lo + i}"} for i in range(n)])
        writer.finish()


def encode_all(sae: SAE, store: ActivationStore, batch_images: int, sparse: bool) -> float:
    """Seconds to encode every patch and CLS token of the store, batch by batch."""
    enc = sae.encode_sparse if sparse else sae.encode
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, acts in store.ordered(LAYER, tokens="all", batch_images=batch_images):
            x = torch.from_numpy(acts)
            enc(x.reshape(-1, x.shape[-1]))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--grid", type=int, default=16, help="patch grid side (tokens = 1 + grid^2)")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--latents", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--batch-images", type=int, default=128, help="images per bookkeeping step")
    ap.add_argument("--encode-tokens", type=int, default=8192, help="tokens per SAE call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    sae = SAE.create(SAEConfig(arch=args.arch, d=args.d, n_latents=args.latents, k=args.k))
    sae.set_normalization(torch.zeros(args.d), 1.0)
    sae.eval()
    config = AnalysisConfig(
        top_n=args.top_n,
        batch_images=args.batch_images,
        encode_tokens=args.encode_tokens,
        tokens="all",
    )
    # the baseline encodes the same tokens in calls of (about) the same size
    batch_images = max(1, args.encode_tokens // (1 + args.grid * args.grid))
    n_tokens = args.images * (1 + args.grid * args.grid)
    runs: dict[str, list[float]] = {"encode": [], "encode_sparse": [], "pass": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="visae-bench-analysis-") as tmp:
        build_store(Path(tmp) / "store", args.images, args.grid, args.d)
        store = ActivationStore.open(Path(tmp) / "store", progress=False)
        encode_all(sae, store, batch_images, sparse=False)  # warm the page cache and kernels
        # interleaved repeats, best of each: every variant sees the same machine load
        for _ in range(args.repeats):
            runs["encode"].append(encode_all(sae, store, batch_images, sparse=False))
            runs["encode_sparse"].append(encode_all(sae, store, batch_images, sparse=True))
            runs["pass"].append(
                stream_pass(sae, store, LAYER, config, tokens="all", progress=False).seconds
            )
            out = Path(tmp) / "analysis"
            t0 = time.perf_counter()
            run_analysis(
                sae,
                store,
                out,
                dataset=NoiseImages(args.images),
                config=config,
                overwrite=True,
                progress=False,
            )
            runs["full"].append(time.perf_counter() - t0)
            artifact_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
            shutil.rmtree(out)

    best = {k: min(v) for k, v in runs.items()}
    rate = {k: n_tokens / t for k, t in best.items()}
    ratio = rate["pass"] / rate["encode_sparse"]
    verdict = "meets" if ratio >= 1.0 else "MISSES"
    lines = [
        f"store: {args.images} images x {1 + args.grid**2} tokens (CLS + {args.grid}x{args.grid} "
        f"patches) x d={args.d}, float16; SAE {args.arch} n_latents={args.latents} k={args.k}; "
        f"top_n={args.top_n}, {args.batch_images} images per step, "
        f"{args.encode_tokens} tokens per SAE call",
        f"sae.encode_sparse (baseline):       {rate['encode_sparse'] / 1e3:8.1f} k tokens/s",
        f"sae.encode (dense codes):           {rate['encode'] / 1e3:8.1f} k tokens/s",
        f"analysis pass (stream_pass):        {rate['pass'] / 1e3:8.1f} k tokens/s",
        f"run_analysis (pass + thumbnails + artifact, {artifact_mb:.0f} MiB): "
        f"{rate['full'] / 1e3:8.1f} k tokens/s",
        f"ratio pass / encode_sparse: {ratio:.2f}  ({verdict} the >= 1 target); "
        f"pass / encode: {rate['pass'] / rate['encode']:.2f}",
        "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    ]
    print("\n".join(lines))
    if not args.no_write:
        cmd = "python benchmarks/bench_analysis.py " + " ".join(sys.argv[1:])
        section = report(
            "Analysis pass vs SAE encode (bench_analysis.py)",
            cmd.strip(),
            lines,
            detail=f"(best of {args.repeats}, interleaved)",
            after=[
                "The pass makes exactly the baseline's encode_sparse calls on the same tokens, "
                "then its bookkeeping (statistics, top-N merges, maps, per-patch codes), so "
                "its ratio to encode_sparse is below 1 by the bookkeeping's share of the time: "
                "the >= 1 target cannot be met against this baseline while the bookkeeping "
                "runs on the same cores after each encode. Against the dense sae.encode (the "
                "issue-5 baseline) it is above 1."
            ],
        )
        write_section(SECTION, section)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
