"""`visae intervene`: edit latents on one image and show what a head outputs before and after."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from visae.errors import VisaeError
from visae.intervene.apply import MODES, MaxActivations, intervene
from visae.intervene.edits import Region, load_mask, parse_edit, parse_region, region_from_mask
from visae.intervene.show import describe, plot_before_after

EDIT_HELP = (
    "LATENTS=VALUE, repeatable: 123=0 (ablate), 123=5 (set), 123=x2 (scale), 123=+1 (add); "
    "a max suffix is in units of the latent's max activation (needs --analysis): 123=-2max"
)


def add_intervene_arguments(p: argparse.ArgumentParser) -> None:
    from visae.heads import HEADS_HELP

    p.add_argument("image", help="an image file")
    p.add_argument("--sae", required=True, help="SAE checkpoint folder")
    p.add_argument("--edit", action="append", required=True, help=EDIT_HELP)
    p.add_argument(
        "--region",
        default="all",
        help="all (default), cls, patches:I,J,... (row-major), or a mask image (white = in) of "
        "the input image's size; a patch is in when the mask covers half of it",
    )
    p.add_argument("--head", required=True, help=HEADS_HELP)
    p.add_argument("--model", help="backbone (default: the one the SAE's store was made with)")
    p.add_argument("--mode", choices=MODES, default="error", help="error: keep the SAE's error")
    p.add_argument("--analysis", help="analysis of the SAE (for max-relative values)")
    p.add_argument("--top", type=int, default=5, help="classes shown (classification heads)")
    p.add_argument("--out", help="before/after PNG (default: IMAGE stem + _intervene.png)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


def run_intervene(args: argparse.Namespace) -> int:
    from PIL import Image

    from visae.backbones import load_backbone
    from visae.devices import resolve_device
    from visae.geometry import model_view
    from visae.heads import load_head
    from visae.sae import SAE

    device = resolve_device(args.device)
    sae = SAE.load(args.sae).to(device).eval()
    model = args.model or (sae.checkpoint_info.get("store") or {}).get("backbone")
    if not model:
        raise VisaeError(f"SAE {args.sae} does not record its model: pass --model")
    backbone = load_backbone(model, device=device)
    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise VisaeError(f"cannot read image {args.image}: {e}") from None
    from visae.intervene.apply import check_pair

    layer = check_pair(backbone, sae)
    head = load_head(args.head, backbone)
    head.check_reads_after(layer)
    region = _region(args.region, backbone, layer, image)
    edits = [parse_edit(text, region) for text in args.edit]
    max_acts = MaxActivations.from_analysis(args.analysis) if args.analysis else None
    pixels = backbone.preprocess([image])
    before = head(backbone, pixels)
    with intervene(backbone, sae, edits, mode=args.mode, max_acts=max_acts):
        after = head(backbone, pixels)
    label = "; ".join(e.label() for e in edits) + (
        " [replace mode]" if args.mode == "replace" else ""
    )
    print(f"edit: {label} at layer {layer} of {backbone.name}")
    print(describe(head, before, after, args.top))
    out = (
        Path(args.out)
        if args.out
        else Path(args.image).with_name(Path(args.image).stem + "_intervene.png")
    )
    view = model_view(image, backbone.preprocessing)
    plot_before_after(head, view, before, after, label, out, args.top)
    print(f"written: {out}")
    return 0


def _region(text: str, backbone: Any, layer: int, image: Any) -> Region:
    from visae.geometry import preprocessing_box

    path = Path(text)
    if text not in ("all", "cls") and not text.startswith("patches:") and path.suffix:
        mask = load_mask(path, image.size)
        box = preprocessing_box(backbone.preprocessing, *image.size)
        return region_from_mask(mask, backbone.layout(layer).grid, box)
    return parse_region(text)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    from visae.heads import HEADS_HELP
    from visae.intervene.study import StudyConfig

    d = StudyConfig()
    p.add_argument("sae", help="SAE checkpoint folder")
    p.add_argument("store", nargs="?", help="activation store (default: the SAE's own)")
    p.add_argument("--head", required=True, help=HEADS_HELP)
    p.add_argument("--analysis", required=True, help="analysis of the SAE (latent maxima)")
    p.add_argument("--eval", help="evaluation folder: matched latents and frequencies")
    p.add_argument(
        "--latents",
        help="instead of --eval's matches: LATENT=CONCEPT,... (controls then need --eval)",
    )
    p.add_argument("--concepts", help="concept source (default: auto, as visae evaluate)")
    p.add_argument("--model", help="backbone (default: the SAE's store's)")
    p.add_argument("--images", choices=("auto", "heldout", "all"), default="auto")
    p.add_argument(
        "--values",
        default=",".join(f"{v:g}" for v in d.values),
        help="doses, in units of the latent's max activation",
    )
    p.add_argument("--max-latents", type=int, default=d.max_latents)
    p.add_argument("--controls", type=int, default=d.controls, help="random latents per match")
    p.add_argument("--images-per-group", type=int, default=d.images)
    p.add_argument("--out", required=True, help="folder for study.json and study.html")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_study_command(args: argparse.Namespace) -> int:
    from visae.backbones import load_backbone
    from visae.devices import resolve_device
    from visae.eval.sources import load_concepts
    from visae.heads import load_head
    from visae.intervene.study import (
        StudyConfig,
        Target,
        latent_frequency,
        matched_latents,
        run_study,
    )
    from visae.sae import SAE
    from visae.store import ActivationStore
    from visae.train.recon import choose_images

    try:
        values = tuple(float(v) for v in args.values.split(","))
    except ValueError:
        raise VisaeError(f"--values {args.values!r}: comma-separated numbers expected") from None
    config = StudyConfig(
        values=values,
        max_latents=args.max_latents,
        controls=args.controls if args.eval else 0,
        images=args.images_per_group,
        suppress=0.0 if 0.0 in values else values[0],
        amplify=2.0 if 2.0 in values else values[-1],
    )
    device = resolve_device(args.device)
    sae = SAE.load(args.sae).to(device).eval()
    store_path = args.store or (sae.checkpoint_info.get("store") or {}).get("path")
    if not store_path:
        raise VisaeError(f"SAE {args.sae} records no store: pass the store")
    store = ActivationStore.open(store_path, progress=not args.quiet)
    model = args.model or store.backbone.get("name")
    backbone = load_backbone(str(model), device=device)
    head = load_head(args.head, backbone)
    if args.latents:
        targets = []
        for item in args.latents.split(","):
            latent, sep, concept = item.partition("=")
            if not sep or not latent.strip().isdigit():
                raise VisaeError(f"--latents item {item!r}: expected LATENT=CONCEPT")
            targets.append(Target(int(latent), concept.strip()))
    elif args.eval:
        targets = matched_latents(args.eval, config)
    else:
        raise VisaeError("give the latents to study: --eval DIR (matched latents) or --latents")
    concepts = load_concepts(args.concepts, store)
    unknown = [t.concept for t in targets if t.concept not in concepts.names]
    if unknown:
        raise VisaeError(f"concept {unknown[0]!r} is not one of {concepts.source}'s concepts")
    images, rule = choose_images(sae, store, args.images)
    doc = run_study(
        backbone,
        sae,
        head,
        store,
        concepts,
        targets,
        args.out,
        config,
        max_acts=MaxActivations.from_analysis(args.analysis),
        frequency=latent_frequency(args.eval) if args.eval else None,
        images=images,
        images_rule=rule,
        progress=not args.quiet,
    )
    for name, entry in doc["summary"].items():
        m, c = entry["matched"], entry["controls"]
        print(
            f"{name} (v = {entry['value']:g}): matched target {_fmt(m['target'])}, other "
            f"{_fmt(m['other'])}, selectivity {_fmt(m['selectivity'])}; controls target "
            f"{_fmt(c['target'])}, other {_fmt(c['other'])}, selectivity {_fmt(c['selectivity'])}"
        )
        diff = entry.get("matched_minus_controls")
        if diff:
            verdict = diff["direction"] if diff["separates"] else "not distinguishable"
            print(f"  matched - controls selectivity {_fmt(diff)}: matched {verdict}")
    print(f"written: {Path(args.out).resolve() / 'study.html'}")
    return 0


def _fmt(v: dict[str, Any]) -> str:
    if v.get("value") is None:
        return "-"
    ci = v.get("ci")
    return f"{v['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
