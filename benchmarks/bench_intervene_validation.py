"""Validation of interventions on real models: do latents matched to concepts move a head's
output on their concept's target far more than elsewhere, and more than random latents?

Reuses the artifacts of bench_eval_validation.py (its --work folder): the DINOv2-S layer-10
16x SAE on the concept scenes with its evaluation, and the EfficientNet-Lite0 stage-4 16x SAE
with its evaluation. Adds their analyses (latent maxima) and a per-patch segmentation probe on
DINOv2-S layer 10 (top-level object categories of the scenes), then runs the intervention study:
- DINOv2-S + segmentation probe: change rate of the probe's class on the concept's patches vs
  the other patches of the same images;
- EfficientNet-Lite0 + its ImageNet classifier: top-1 change rate on images with the concept
  vs images without it;
each for the best-matched latent of up to 10 object concepts and one frequency-matched random
latent per match, latents set to v x their max activation on every patch token.

    .venv/bin/python benchmarks/bench_intervene_validation.py   # after bench_eval_validation.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.analysis import Analysis, run_analysis
from visae.backbones import load_backbone
from visae.data.default import cache_dir
from visae.eval.sources import load_concepts
from visae.heads import load_head
from visae.heads.probes import ProbeConfig, load_probe, train_probe
from visae.intervene import MaxActivations
from visae.intervene.study import (
    StudyConfig,
    latent_frequency,
    matched_latents,
    run_study,
)
from visae.sae import SAE
from visae.store import ActivationStore
from visae.train.recon import choose_images

SECTION = "bench_intervene_validation"


def analysis_of(sae_dir: Path, store: ActivationStore, out: Path) -> Analysis:
    if (out / "analysis.json").is_file():
        return Analysis.load(out)
    return run_analysis(sae_dir, store, out, progress=True)


def study(
    name: str,
    work: Path,
    sae_dir: Path,
    store: ActivationStore,
    head_spec: str,
    config: StudyConfig,
    only_objects: bool,
) -> dict:
    sae = SAE.load(sae_dir)
    backbone = load_backbone(str(store.backbone["name"]))
    head = load_head(head_spec, backbone)
    analysis = analysis_of(sae_dir, store, work / f"analysis-{name}")
    evaluation = work / "evals" / name
    targets = matched_latents(evaluation, config)
    if only_objects:
        targets = [t for t in targets if t.concept.startswith("object:")] or targets
    concepts = load_concepts("scenes", store)
    images, rule = choose_images(sae, store, "auto")
    return run_study(
        backbone,
        sae,
        head,
        store,
        concepts,
        targets,
        work / f"study-{name}",
        config,
        max_acts=MaxActivations.from_analysis(analysis),
        frequency=latent_frequency(evaluation),
        images=images,
        images_rule=rule,
    )


def lines_of(title: str, doc: dict) -> list[str]:
    out = [title]
    for name, entry in doc["summary"].items():
        for group in ("matched", "controls"):
            g = entry[group]
            out.append(
                f"  {name:<8} (v = {entry['value']:g}) {group:<8} target {_c(g['target'])}  "
                f"other {_c(g['other'])}  selectivity {_c(g['selectivity'])}"
            )
        diff = entry.get("matched_minus_controls")
        if diff:
            verdict = f"matched {diff['direction']}" if diff["separates"] else "not distinguishable"
            out.append(f"  {name:<8} matched - controls selectivity {_c(diff)} ({verdict})")
    values = doc["settings"]["values"]
    out.append("  dose response (mean change rate, target / other):")
    for control in (False, True):
        rows = [r for r in doc["latents"] if (r["control_of"] is not None) == control]
        cells = []
        for v in values:
            t = [r["rates"][str(float(v))]["target"] for r in rows]
            o = [r["rates"][str(float(v))]["other"] for r in rows]
            cells.append(f"{v:+g}: {_m(t):.2f}/{_m(o):.2f}")
        out.append(f"    {'controls' if control else 'matched':<9} " + "  ".join(cells))
    return out


def _m(values: list) -> float:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else float("nan")


def _c(v: dict) -> str:
    if not v or v.get("value") is None:
        return "-"
    ci = v.get("ci")
    return f"{v['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-eval-validation")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work, start, note = args.work, time.perf_counter(), load_note()
    import json

    dino = ActivationStore.open(work / "store-dinov2", progress=False)
    eff = ActivationStore.open(work / "store-effnet", progress=False)
    probe_dir = work / "probe-dinov2-seg"
    if not (probe_dir / "probe.json").is_file():
        train_probe(dino, ProbeConfig(kind="patch", layer=10, concepts="scenes"), probe_dir)
    probe = load_probe(probe_dir)
    config = StudyConfig(max_latents=10, controls=1, images=8)
    docs = {}
    for name, store, head, objects in (
        ("dino-16x", dino, f"probe:{probe_dir}", True),
        ("effnet-16x", eff, "classifier", True),
    ):
        done = work / f"study-{name}" / "study.json"
        sae_dir = (
            work / ("runs-dinov2" if name.startswith("dino") else "runs-effnet") / name / "sae"
        )
        docs[name] = (
            json.loads(done.read_text())
            if done.is_file()
            else json.loads(json.dumps(study(name, work, sae_dir, store, head, config, objects)))
        )
    heldout = probe.info["metrics"]["heldout"]
    block = [
        f"segmentation probe (DINOv2-S layer 10, {len(probe.labels)} classes): held-out patch "
        f"accuracy {heldout['accuracy']:.3f}, mIoU {heldout['miou']:.3f} (majority baseline "
        f"mIoU {probe.info['metrics']['baseline']['miou']:.3f})",
        "",
        *lines_of(
            "DINOv2-S 16x SAE + segmentation probe (target = the concept's patches)",
            docs["dino-16x"],
        ),
        "",
        *lines_of(
            "EfficientNet-Lite0 16x SAE + its ImageNet classifier (target = images with "
            "the concept)",
            docs["effnet-16x"],
        ),
        "",
        f"total {(time.perf_counter() - start) / 60:.1f} min; {note}",
    ]
    print("\n".join(block))
    if not args.no_write:
        write_section(
            SECTION,
            report(
                "Interventions on real models: matched latents vs random controls "
                "(bench_intervene_validation.py)",
                "python benchmarks/bench_intervene_validation.py",
                block,
                before=[
                    "Change rate: the fraction of target (or other) units whose head output "
                    "changes when the latent is set to v x its max activation on every patch "
                    "token (0 ablates it); selectivity = target - other; intervals are 95% "
                    "bootstrap intervals over latents. Images: the SAE's held-out images."
                ],
            ),
        )


if __name__ == "__main__":
    main()
