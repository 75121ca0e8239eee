"""Scale-out on a GPU machine: one GPU against torchrun over every GPU of the node.

    python benchmarks/gpu_scale.py [--gpus N] [--images 1024] [--tokens 20000000]

It refuses to run without CUDA. On one node of N GPUs it times, as whole commands:
1. `visae extract` of the concept scenes through DINOv2-S on one GPU, then under
   `torchrun --nproc-per-node N` (one rank per GPU), and checks that the two stores are equal
   byte for byte (extraction is deterministic per shard whatever the ranks);
2. `visae train` of a TopK SAE (16,384 latents, k=32, batch 4,096) on a synthetic store of
   sparse dictionary tokens, on one GPU and data-parallel on N (NCCL all-reduce of the
   gradients), and the largest weight difference between the two (float rounding, which
   training amplifies a little).
With one GPU it still runs both halves (N=1 against N=1: the launcher's overhead).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section
from gpu_check import synthetic_store

from visae.sae import SAE

VISAE = [sys.executable, "-m", "visae"]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_scale.py needs CUDA: run it on a GPU machine")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    args = parser.parse_args()
    note = load_note()
    ranks = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.gpus}",
        "-m",
        "visae",
    ]
    work = Path(tempfile.mkdtemp(prefix="gpu-scale-"))
    extract = ["extract", "--dataset", f"scenes#{args.images}", "--device", "cuda", "--quiet"]
    extract += ["--batch-size", "128", "--shard-images", "128"]
    timed([*VISAE, *extract, "--out", str(work / "warm")])  # renders and caches the scenes
    t_one = timed([*VISAE, *extract, "--out", str(work / "one")])
    t_all = timed([*ranks, *extract, "--out", str(work / "all")])
    same = tree(work / "one") == tree(work / "all")

    store = work / "synthetic"
    synthetic_store(store, n_images=max(256, args.tokens // 257 // 4), d=768)
    train = ["train", str(store), "--device", "cuda", "--arch", "topk", "--k", "32"]
    train += ["--n-latents", "16384", "--batch-size", "4096", "--quiet"]
    train += ["--total-tokens", str(args.tokens), "--eval-every-tokens", str(args.tokens)]
    s_one = timed([*VISAE, *train, "--out", str(work / "train-one")])
    s_all = timed([*ranks, *train, "--out", str(work / "train-all")])
    a = SAE.load(work / "train-one" / "topk-n16384-k32" / "sae").state_dict()
    b = SAE.load(work / "train-all" / "topk-n16384-k32" / "sae").state_dict()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    name = torch.cuda.get_device_name(0)
    lines = [
        f"{args.gpus} x {name}",
        f"extract {args.images} scenes, DINOv2-S: 1 GPU {t_one:.1f} s, {args.gpus} GPUs "
        f"{t_all:.1f} s ({t_one / t_all:.2f}x); stores equal byte for byte: {same}",
        f"train TopK 16,384 x 768, {args.tokens:,} tokens: 1 GPU {s_one:.1f} s, {args.gpus} "
        f"GPUs {s_all:.1f} s ({s_one / s_all:.2f}x); max |weight difference| {diff:.1e}",
    ]
    print("\n".join(lines))
    write_section(
        "gpu-scale",
        report(
            "Scale-out on GPUs: one GPU vs torchrun over the node (gpu_scale.py)",
            f"python benchmarks/gpu_scale.py --gpus {args.gpus} --images {args.images} "
            f"--tokens {args.tokens}",
            lines,
            f"({note})",
        ),
    )


if __name__ == "__main__":
    main()
