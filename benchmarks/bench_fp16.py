"""The float16 store's cost: relative error of float16 vs float32 activations of the real
DINOv2-S on real photos, per layer and token kind."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, write_section

from visae.backbones import DEFAULT_BACKBONE, load_backbone
from visae.data import load_dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="skimage")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()

    backbone = load_backbone(DEFAULT_BACKBONE)
    dataset = load_dataset(args.dataset)
    layers = list(range(backbone.n_layers))
    images = [dataset.image(i) for i in range(len(dataset))]
    recorded = backbone.record(backbone.preprocess(images), layers)
    rows = [f"{'layer':>5} {'tokens':>6} {'rel. L2 error':>14} {'max |err|':>10} {'max |x|':>9}"]
    worst, largest = 0.0, 0.0
    for layer in layers:
        acts = recorded[layer].float().numpy()
        n_special = backbone.layout(layer).n_special
        for kind, part in (("cls", acts[:, :n_special]), ("patch", acts[:, n_special:])):
            x32 = part.reshape(-1, part.shape[-1]).astype(np.float64)
            x16 = part.astype(np.float16).astype(np.float64).reshape(x32.shape)
            rel = np.linalg.norm(x16 - x32) / np.linalg.norm(x32)
            worst, largest = max(worst, rel), max(largest, float(np.abs(x32).max()))
            rows.append(
                f"{layer:>5} {kind:>6} {rel:>14.2e} {np.abs(x16 - x32).max():>10.2e} "
                f"{np.abs(x32).max():>9.1f}"
            )
    text = report(
        "Float16 store cost: float16 vs float32 activations (bench_fp16.py)",
        f"python benchmarks/bench_fp16.py --dataset {args.dataset}",
        [
            *rows,
            f"worst relative L2 error over layers and token kinds: {worst:.2e}",
            f"largest |activation|: {largest:.1f} (float16 overflows above 65504)",
        ],
        detail=f"({len(images)} real photos, {DEFAULT_BACKBONE}, every layer)",
        after=[
            "Relative L2 error = ||fp16(x) - x|| / ||x|| over all tokens of that kind;\n"
            "float16's 11-bit significand puts it near 2^-12. Squared (~5e-8 of ||x||^2) it is\n"
            "what float16 adds to an SAE's squared error: orders of magnitude below the NMSE of\n"
            "the SAEs trained on these activations (0.1-0.2, see the SAE sections)."
        ],
    )
    print(text)
    if not args.no_write:
        write_section("bench_fp16", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
