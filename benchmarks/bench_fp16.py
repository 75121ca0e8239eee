"""What the float16 store costs an SAE: the same SAE trained on a float16 and on a float32 store
of the same real DINOv2-S activations, compared by held-out NMSE.

The float32 store is extracted once; the float16 store holds exactly those activations cast to
float16 (what `visae extract --dtype float16` writes), so the two differ in the cast only.
Both SAEs train with the same seed, schedule and held-out images, and each is evaluated on the
held-out images of both stores: the cross term says whether an SAE trained on float16 data is
any worse on the true (float32) activations.

    .venv/bin/python benchmarks/bench_fp16.py               # prints and updates RESULTS.md
    .venv/bin/python benchmarks/bench_fp16.py --images 64 --tokens 20000 --no-write
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.backbones import DEFAULT_BACKBONE, load_backbone
from visae.data import load_dataset
from visae.sae import SAEConfig
from visae.store import ActivationStore, StoreSpec, StoreWriter, extract
from visae.train import RunSpec, TrainConfig, eval_recon, train

LAYER = 10


def float16_copy(src: ActivationStore, out: Path) -> ActivationStore:
    """The same store with every shard cast to float16 (same images, shards and metadata)."""
    spec = StoreSpec.from_manifest({**src.manifest, "dtype": "float16"})
    metadata = src.metadata()
    with StoreWriter(out, spec) as writer:
        first = 0
        for shard in src.manifest["shards"]:
            ids = list(range(first, first + shard["images"]))
            acts = next(src.ordered(LAYER, "all", len(ids), images=ids))[1]
            writer.append_shard({LAYER: acts}, [metadata[i] for i in ids])
            first += shard["images"]
        writer.finish()
    return ActivationStore.open(out, progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="scenes to extract")
    ap.add_argument("--tokens", type=int, default=400_000, help="training tokens per SAE")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    start, load = time.perf_counter(), load_note()

    with tempfile.TemporaryDirectory(prefix="visae-bench-fp16-") as tmp:
        root = Path(tmp)
        dataset = load_dataset(f"scenes#{args.images}")
        backbone = load_backbone(DEFAULT_BACKBONE)
        s32 = extract(backbone, dataset, root / "s32", layers=[LAYER], dtype="float32")
        s16 = float16_copy(s32, root / "s16")
        stores = {"float32": s32, "float16": s16}
        d = s32.d(LAYER)
        saes = {}
        # the third run differs from the first in the SAE's initialisation seed only: the
        # spread that any difference between the stores must be read against
        for name, store_name, seed in (
            ("float32", "float32", 0),
            ("float16", "float16", 0),
            ("float32 (seed 1)", "float32", 1),
        ):
            sae_cfg = SAEConfig(arch="topk", d=d, n_latents=16 * d, k=32, seed=seed)
            cfg = TrainConfig(
                store=str(stores[store_name].path),
                out=str(root / f"runs-{store_name}-{seed}"),
                layer=LAYER,
                total_tokens=args.tokens,
                eval_every_tokens=args.tokens,
                checkpoint_every_tokens=10 * args.tokens,
            )
            saes[name] = train(cfg, [RunSpec("topk", sae_cfg, 2e-3)])["topk"]
        nmse = {
            (trained, on): eval_recon(
                saes[trained], stores[on], images="heldout", progress=False
            ).metrics["nmse"]
            for trained in saes
            for on in stores
        }

    rows = [f"{'SAE trained on store':<24} {'held-out NMSE on float32':>25} {'on float16':>11}"]
    for trained in saes:
        rows.append(
            f"{trained:<24} {nmse[trained, 'float32']:>25.5f} {nmse[trained, 'float16']:>11.5f}"
        )
    gap = nmse["float16", "float32"] / nmse["float32", "float32"] - 1
    spread = nmse["float32 (seed 1)", "float32"] / nmse["float32", "float32"] - 1
    rows += [
        f"float16-trained vs float32-trained SAE, on the true float32 activations: {gap:+.3%}",
        f"another initialisation seed, same float32 store:                       {spread:+.3%}",
        load,
        f"wall time {time.perf_counter() - start:.0f} s",
    ]
    text = report(
        "Float16 store cost: the same SAE trained on float16 vs float32 (bench_fp16.py)",
        "python benchmarks/bench_fp16.py " + " ".join(sys.argv[1:]),
        rows,
        detail=(
            f"({args.images} default scenes, {DEFAULT_BACKBONE} layer {LAYER} patch tokens; "
            f"TopK SAE, 16x, k=32, lr 2e-3, {args.tokens:,} training tokens; the trainer's "
            "5% held-out images)"
        ),
        after=[
            "Both stores hold the same images; the float16 one is the float32 one cast. Each SAE\n"
            "is scored on the held-out images of both stores. The float16 cost is the first\n"
            "difference; the second (another seed on the same store) is the noise it is read\n"
            "against."
        ],
    )
    print(text)
    if not args.no_write:
        write_section("bench_fp16", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
