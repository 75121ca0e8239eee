"""GPU check: the demo's SAE sweep trained on CUDA against the same sweep on the CPU.

Run it on a machine with a CUDA GPU (it refuses to run without one):

    python benchmarks/gpu_check.py                      # synthetic store, prints + RESULTS.md
    python benchmarks/gpu_check.py --store demo-out/store --layer 10

What it checks, on the same store, seed and schedule:
1. one training step from identical weights gives the same gradients on both devices (the
   sparse TopK step's kernels on CUDA against the CPU ones), to float32 tolerance;
2. the whole sweep (TopK k=32 as in `make demo`, BatchTopK, a Matryoshka TopK and a bf16 TopK)
   reaches the same held-out NMSE and L0 on CUDA as on the CPU (within 2% relative: the runs
   differ by float rounding only, which training amplifies a little);
3. training throughput on each device.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.sae import SAE, SAEConfig
from visae.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter
from visae.train import RunSpec, TrainConfig, train


def synthetic_store(path: Path, n_images: int, d: int, seed: int = 0) -> None:
    """Tokens that are sparse sums of a random dictionary plus noise: an SAE can learn them."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((4 * d, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    spec = StoreSpec(
        backbone={"name": "synthetic", "weights_hash": "none", "preprocessing": {}},
        dataset={"name": "sparse-dictionary", "fingerprint": f"gpu-check-{n_images}-{d}"},
        layers=[LayerSpec(0, d, {"n_cls": 1, "n_registers": 0, "grid": [16, 16]})],
        dtype="float16",
        shard_images=256,
    )
    with StoreWriter(path, spec) as writer:
        for lo in range(0, n_images, 256):
            n = min(256, n_images - lo)
            idx = rng.integers(0, len(atoms), (n, 257, 8))
            coef = rng.exponential(1.0, (n, 257, 8)).astype(np.float32)
            acts = (coef[..., None] * atoms[idx]).sum(2)
            acts += 0.05 * rng.standard_normal(acts.shape).astype(np.float32)
            writer.append_shard({0: acts}, [{"source": f"synthetic/{lo + i}"} for i in range(n)])
        writer.finish()


def sweep(d: int) -> list[RunSpec]:
    n = 16 * d
    return [
        RunSpec("topk-k32", SAEConfig(arch="topk", d=d, n_latents=n, k=32), 2e-3),
        RunSpec("batchtopk-k32", SAEConfig(arch="batchtopk", d=d, n_latents=n, k=32), 2e-3),
        RunSpec(
            "matryoshka-topk-k32",
            SAEConfig(arch="topk", d=d, n_latents=n, k=32, matryoshka=(1 / 16, 1 / 4, 1.0)),
            2e-3,
        ),
        RunSpec(
            "topk-k32-bf16",
            SAEConfig(arch="topk", d=d, n_latents=n, k=32, compute_dtype="bfloat16"),
            2e-3,
        ),
    ]


def gradient_check(store: ActivationStore, layer: int, runs: list[RunSpec]) -> list[str]:
    """Max relative gradient difference CPU vs CUDA after one step from the same weights."""
    batch = store.sample_tokens(layer, "patch", 4096, seed=0)
    lines = []
    for run in runs:
        cpu = SAE.create(run.sae)
        cpu.init_from_sample(batch)
        gpu = copy.deepcopy(cpu).to("cuda")
        grads = {}
        for name, sae in (("cpu", cpu), ("cuda", gpu)):
            sae.train()
            sae.zero_grad(set_to_none=True)
            out = sae.loss(torch.from_numpy(batch).to(sae.W_dec.device), update_state=False)
            out.loss.backward()
            grads[name] = {k: p.grad.detach().cpu() for k, p in sae.named_parameters()}
        worst = max(
            float(
                (grads["cpu"][k] - grads["cuda"][k]).norm()
                / grads["cpu"][k].norm().clamp_min(1e-30)
            )
            for k in grads["cpu"]
        )
        lines.append(f"{run.name:<22} max relative gradient difference CPU vs CUDA: {worst:.2e}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="an activation store (default: a synthetic one)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--images", type=int, default=2048, help="synthetic store size")
    ap.add_argument("--tokens", type=int, default=600_000, help="training tokens per SAE")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a GPU machine", file=sys.stderr)
        return 2
    load = load_note()
    with tempfile.TemporaryDirectory(prefix="visae-gpu-check-") as tmp:
        root = Path(tmp)
        path = Path(args.store) if args.store else root / "store"
        if not args.store:
            synthetic_store(path, args.images, 384)
        store = ActivationStore.open(path, progress=False)
        layer = store.layers[-1] if args.layer is None else args.layer
        runs = sweep(store.d(layer))
        lines = gradient_check(store, layer, runs)
        results, seconds = {}, {}
        for device in ("cpu", "cuda"):
            cfg = TrainConfig(
                store=str(path),
                out=str(root / f"runs-{device}"),
                layer=layer,
                total_tokens=args.tokens,
                eval_every_tokens=args.tokens,
                checkpoint_every_tokens=10 * args.tokens,
                device=device,
            )
            t0 = time.perf_counter()
            train(cfg, runs, progress=False)
            seconds[device] = time.perf_counter() - t0
            results[device] = json.loads((root / f"runs-{device}" / "summary.json").read_text())
    ok = True
    lines.append(f"{'run':<22} {'NMSE cpu':>9} {'NMSE cuda':>10} {'L0 cpu':>7} {'L0 cuda':>8}")
    for run in runs:
        c, g = results["cpu"][run.name], results["cuda"][run.name]
        close = abs(g["nmse"] / c["nmse"] - 1) < 0.02 and abs(g["l0"] / c["l0"] - 1) < 0.02
        ok &= close
        lines.append(
            f"{run.name:<22} {c['nmse']:>9.4f} {g['nmse']:>10.4f} {c['l0']:>7.1f} {g['l0']:>8.1f}"
            + ("" if close else "  DIFFERS")
        )
    total = args.tokens * len(runs)
    lines += [
        f"sweep of {len(runs)} SAEs x {args.tokens:,} tokens: cpu {seconds['cpu']:.0f} s "
        f"({total / seconds['cpu']:,.0f} tok/s), cuda {seconds['cuda']:.0f} s "
        f"({total / seconds['cuda']:,.0f} tok/s), speed-up {seconds['cpu'] / seconds['cuda']:.1f}x",
        f"device: {torch.cuda.get_device_name(0)}; {load}",
        "verdict: " + ("CUDA matches the CPU" if ok else "CUDA DIFFERS from the CPU"),
    ]
    text = report(
        "GPU check: the demo sweep on CUDA vs CPU (gpu_check.py)",
        "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        lines,
    )
    print(text)
    if not args.no_write:
        write_section("gpu_check", text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
