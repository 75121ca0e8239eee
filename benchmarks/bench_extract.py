"""Extraction: what writing a store costs over the bare forward, and what reduced-precision
forwards (`extract(..., autocast="bf16")`) save and cost.

1. Overhead: `visae.store.extract` vs the bare backbone forward on the same images (both read,
   preprocess and run the same batches through the real DINOv2-S; extract also converts to
   float16, checks finiteness and writes shards, metadata and the manifest). Target <= 5%.
2. Autocast: the same images extracted in full precision and under bf16 autocast (throughput,
   and the relative L2 difference of the stored activations), then the same SAE (TopK, same
   seed, same held-out images) trained on each store: the held-out NMSE each reaches
   (`summary.json` of the run), so the speed-up is weighed against what it does to an SAE.

    .venv/bin/python benchmarks/bench_extract.py                   # prints, updates RESULTS.md
    .venv/bin/python benchmarks/bench_extract.py --quick --no-write   # a check that it runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.backbones import DEFAULT_BACKBONE, load_backbone
from visae.data import Subset, load_dataset
from visae.sae import SAEConfig
from visae.store import ActivationStore, extract
from visae.train import RunSpec, TrainConfig, default_lr, train

TARGET = 0.05
PRECISIONS = (None, "bf16")


def bare_forward(backbone, dataset, layers: list[int], batch_size: int) -> float:
    """Seconds to load, preprocess and record every image, keeping nothing."""
    start = time.perf_counter()
    for lo in range(0, len(dataset), batch_size):
        images = [dataset.image(i) for i in range(lo, min(lo + batch_size, len(dataset)))]
        _ = [dataset.metadata(i) for i in range(lo, min(lo + batch_size, len(dataset)))]
        backbone.record(backbone.preprocess(images), layers)
    return time.perf_counter() - start


def with_store(
    backbone,
    dataset,
    layers: list[int],
    batch_size: int,
    out: Path,
    autocast: str | None,
    device: str,
) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    extract(
        backbone,
        dataset,
        out,
        layers=layers,
        batch_size=batch_size,
        device=device,
        autocast=autocast,
        progress=False,
    )
    return time.perf_counter() - start


def relative_l2(a: ActivationStore, b: ActivationStore, layer: int) -> float:
    """||a - b|| / ||b|| over every stored token, accumulated image batch by image batch."""
    num = den = 0.0
    for (_, x), (_, y) in zip(a.ordered(layer), b.ordered(layer), strict=True):
        num += float(((x - y) ** 2).sum())
        den += float((y**2).sum())
    return (num / den) ** 0.5


def heldout_nmse(store: Path, out: Path, layer: int, args: argparse.Namespace) -> dict:
    """Train the benchmark's SAE on `store`; the final held-out evaluation of the run."""
    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        layer=layer,
        tokens="patch",
        batch_size=args.train_batch,
        holdout_fraction=args.holdout,
        eval_tokens=args.eval_tokens,
        norm_sample_tokens=args.eval_tokens,
        eval_every_tokens=10**12,
        checkpoint_every_tokens=10**12,
        lr_warmup_steps=20,
        sparsity_warmup_steps=0,
        seed=0,
    )
    d = ActivationStore.open(store, progress=False).d(layer)
    n_latents = args.expansion * d
    sae = SAEConfig(arch="topk", d=d, n_latents=n_latents, k=args.k)
    train(cfg, [RunSpec("topk", sae, default_lr(n_latents))], progress=False)
    return json.loads((out / "summary.json").read_text())["topk"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--layers", default="10")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="device of the backbone (cpu, cuda, ...)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--expansion", type=int, default=16, help="SAE latents per input dimension")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=4096)
    ap.add_argument("--holdout", type=float, default=0.1, help="fraction of images held out")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if args.quick:
        args.dataset, args.repeats, args.batch_size = "skimage#8", 1, 4
        args.expansion, args.k, args.train_batch, args.holdout, args.eval_tokens = (
            2,
            8,
            256,
            0.25,
            512,
        )

    torch.manual_seed(0)
    backbone = load_backbone(DEFAULT_BACKBONE).to(args.device)
    dataset = load_dataset(args.dataset)
    layers = [int(x) for x in args.layers.split(",")]
    note = load_note()
    bare: list[float] = []
    stored: dict[str | None, list[float]] = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # warm caches, threads and each precision's kernels on the first two batches
        first = Subset(dataset, range(min(len(dataset), 2 * args.batch_size)))
        bare_forward(backbone, first, layers, args.batch_size)
        for p in PRECISIONS:
            with_store(backbone, first, layers, args.batch_size, root / "warm", p, args.device)
        for _ in range(args.repeats):  # interleaved, best of each
            bare.append(bare_forward(backbone, dataset, layers, args.batch_size))
            for p in PRECISIONS:
                out = root / f"store-{p or 'fp32'}"
                stored[p].append(
                    with_store(backbone, dataset, layers, args.batch_size, out, p, args.device)
                )
        stores = {p: ActivationStore.open(root / f"store-{p or 'fp32'}") for p in PRECISIONS}
        layer = layers[-1]
        diff = relative_l2(stores["bf16"], stores[None], layer)
        evals = {
            p: heldout_nmse(root / f"store-{p or 'fp32'}", root / f"run-{p or 'fp32'}", layer, args)
            for p in PRECISIONS
        }

    n = len(dataset)
    overhead = min(stored[None]) / min(bare) - 1
    verdict = "meets" if overhead <= TARGET else "misses"
    speedup = min(stored[None]) / min(stored["bf16"])
    nmse32, nmse16 = evals[None]["nmse"], evals["bf16"]["nmse"]
    lines = [
        note,
        f"{n} images, {DEFAULT_BACKBONE} on {args.device}, layers {layers}, batch "
        f"{args.batch_size}, float16 store, torch {torch.__version__}",
        f"bare forward (load + preprocess + record): {n / min(bare):7.1f} images/s",
        f"extract to a store:                        {n / min(stored[None]):7.1f} images/s",
        f"overhead: {overhead * 100:+.1f}%  ({verdict} the <= {TARGET * 100:.0f}% target)",
        f"extract under bf16 autocast:               {n / min(stored['bf16']):7.1f} images/s "
        f"({speedup:.2f}x full precision)",
        f"layer {layer}: relative L2 difference of the bf16-autocast store: {diff * 100:.2f}%",
        f"TopK SAE ({args.expansion}x, k={args.k}, one epoch, {args.holdout:.0%} of images "
        f"held out, {evals[None]['eval_tokens']} held-out tokens), held-out NMSE:",
        f"  trained on the full-precision store:  {nmse32:.4f}",
        f"  trained on the bf16-autocast store:   {nmse16:.4f}  "
        f"({(nmse16 / nmse32 - 1) * 100:+.1f}% relative)",
    ]
    text = report(
        "Extraction: store overhead and bf16 autocast (bench_extract.py)",
        f"python benchmarks/bench_extract.py --dataset '{args.dataset}' --layers {args.layers}"
        + (f" --device {args.device}" if args.device != "cpu" else ""),
        lines,
        detail=f"(best of {args.repeats}, interleaved)",
        after=[
            "Each SAE is evaluated on the held-out images of its own store: the same images "
            "(same split seed), in the precision each store holds."
        ],
    )
    print(text)
    if not args.no_write:
        write_section("bench_extract", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
