"""`visae vlm build` (train the packaged VLM's projector), `visae vlm ask` (its answers about
images) and `visae steer` (steer a VLM's answers through its tower's SAE)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from visae.errors import VisaeError
from visae.intervene.apply import MODES

VLM_HELP = (
    "packaged (visae's tiny LLaVA: DINOv2-S + SmolLM2-135M), or a LLaVA hub id or folder "
    "(llava-hf/llava-1.5-7b-hf)"
)


def add_vlm_arguments(sub: Any) -> None:
    from visae.vlm.build import BuildConfig
    from visae.vlm.packaged import DEFAULT_PROJECTOR

    vlm = sub.add_parser("vlm", help="the packaged tiny VLM: train its projector, ask it")
    vsub = vlm.add_subparsers(dest="vlm_command", required=True, metavar="ACTION")
    d = BuildConfig()
    p = vsub.add_parser(
        "build",
        help="train the packaged VLM's projector (LLaVA stage 1 + one-word answers; ~20 min)",
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_PROJECTOR),
        help="projector folder (default: the committed one, which this rebuilds)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing projector")
    p.add_argument(
        "--align-epochs", type=int, default=d.align_epochs, help="warm-start epochs (0: none)"
    )
    p.add_argument("--caption-samples", type=int, default=d.caption_samples)
    p.add_argument("--answer-samples", type=int, default=d.answer_samples)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--scenes", type=int, default=d.scenes, help="training scenes rendered")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_build)

    p = vsub.add_parser("ask", help="a VLM's answers about images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--question", help="default: the one-word question of the steering setup")
    p.add_argument("--vlm", default="packaged", help=VLM_HELP)
    p.add_argument("--projector", help="packaged VLM: a projector folder from visae vlm build")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.set_defaults(handler=run_ask)


def load_vlm(spec: str, projector: str | None = None, device: str = "cpu", dtype: str = "float32"):
    from visae.vlm.model import load_llava
    from visae.vlm.packaged import DEFAULT_PROJECTOR, packaged_vlm

    if spec == "packaged":
        return packaged_vlm(projector or DEFAULT_PROJECTOR, device=device)
    if projector:
        raise VisaeError("--projector is for the packaged VLM only")
    return load_llava(spec, device=device, dtype=dtype)


def run_build(args: argparse.Namespace) -> int:
    from visae.vlm.build import BuildConfig, build
    from visae.vlm.packaged import PROJECTOR_WEIGHTS

    out = Path(args.out)
    if (out / PROJECTOR_WEIGHTS).is_file() and not args.overwrite:
        raise VisaeError(f"{out} holds a projector already: pass --overwrite to rebuild it")
    config = BuildConfig(
        align_epochs=args.align_epochs,
        caption_samples=args.caption_samples,
        answer_samples=args.answer_samples,
        batch_size=args.batch_size,
        lr=args.lr,
        scenes=args.scenes,
        seed=args.seed,
    )
    path = build(out, config, progress=not args.quiet)
    info = json.loads((path / "projector.json").read_text(encoding="utf-8"))
    losses = ", ".join(
        f"{k} loss {v['first_loss']:.2f} -> {v['last_loss']:.2f}"
        for k, v in info["stages"].items()
        if v.get("steps", 1)
    )
    print(f"projector written to {path} in {info['seconds']:.0f} s ({losses})")
    return 0


def run_ask(args: argparse.Namespace) -> int:
    from PIL import Image

    from visae.devices import resolve_device
    from visae.vlm.model import INSTRUCTION

    device = resolve_device(args.device)
    vlm = load_vlm(args.vlm, args.projector, device)
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise VisaeError(f"cannot read image {path}: {e}") from None
    question = args.question or INSTRUCTION
    answers = vlm.generate(vlm.pixels(images), question, args.max_new_tokens)
    for path, answer in zip(args.images, answers, strict=True):
        print(f"{path}: {answer}")
    return 0


def add_steer_arguments(p: argparse.ArgumentParser) -> None:
    from visae.vlm.steer import SteerConfig

    d = SteerConfig()
    p.add_argument("--sae", required=True, help="SAE checkpoint on the VLM tower's layer")
    p.add_argument("--vlm", default="packaged", help=VLM_HELP)
    p.add_argument("--projector", help="packaged VLM: a projector folder from visae vlm build")
    p.add_argument(
        "--layer", type=int, help="tower layer to edit (default: the one the projector reads)"
    )
    p.add_argument("--eval", help="evaluation folder: each latent's matched concept")
    p.add_argument(
        "--analysis",
        help="analysis of the SAE: latent maxima (relative values) and, without --eval, "
        "each latent's top label",
    )
    p.add_argument("--dataset", default="scenes", help="images of the many-images setting")
    p.add_argument("--images", type=int, default=d.images, help="images per latent (setting 1)")
    p.add_argument("--latents", type=int, default=d.latents, help="coarsest latents (setting 1)")
    p.add_argument(
        "--white-latents", type=int, default=d.white_latents, help="latents on a white image"
    )
    p.add_argument(
        "--values",
        default=",".join(f"{v:g}" for v in d.values),
        help="set values: multiples of the latent's max activation (or absolute: --absolute)",
    )
    p.add_argument("--absolute", action="store_true", help="values in the SAE's code units")
    p.add_argument("--mode", choices=MODES, default=d.mode, help="error: keep the SAE's error")
    p.add_argument("--question", default=d.question)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="folder for steer.json, answers.csv, report.html")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", help="hub LLaVA weights: float32, float16, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_steer(args: argparse.Namespace) -> int:
    from visae.data import load_dataset
    from visae.devices import resolve_device
    from visae.sae import SAE
    from visae.vlm.steer import SteerConfig, load_concepts, steer

    if not args.eval and not args.analysis:
        raise VisaeError("steering needs the latents' concepts: pass --eval or --analysis")
    try:
        values = tuple(float(v) for v in args.values.split(","))
    except ValueError:
        raise VisaeError(
            f"--values {args.values!r}: expected numbers separated by commas"
        ) from None
    config = SteerConfig(
        values=values,
        relative=not args.absolute,
        mode=args.mode,
        latents=args.latents,
        images=args.images,
        white_latents=args.white_latents,
        question=args.question,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    sae = SAE.load(args.sae).to(device).eval()
    vlm = load_vlm(args.vlm, args.projector, device, args.dtype)
    dataset = load_dataset(args.dataset, progress=not args.quiet) if args.latents else None
    concepts = load_concepts(args.eval, args.analysis, getattr(dataset, "taxonomy", None))
    images = _LazyImages(dataset) if dataset is not None else []
    ids = [str(i) for i in range(len(images))]
    result = steer(
        vlm,
        sae,
        concepts,
        images,
        ids,
        args.out,
        config=config,
        analysis=args.analysis,
        layer=args.layer,
        sae_name=str(args.sae),
        progress=not args.quiet,
    )
    for s in result["settings"]:
        for dose in s["doses"]:
            b = dose["success"]
            print(
                f"{s['setting']:>9} value {dose['value']:g}: success {b['steered']['mean']:.3f} "
                f"[{b['steered']['lo']:.3f}, {b['steered']['hi']:.3f}] vs unsteered "
                f"{b['unsteered']['mean']:.3f}, random latent {b['random_latent']['mean']:.3f}, "
                f"shuffled names {b['shuffled_names']['mean']:.3f} "
                f"({b['minus_random_latent']['verdict']} vs random latent)"
            )
    print(f"report: {Path(args.out).resolve() / 'report.html'}")
    return 0


class _LazyImages:
    """A dataset's images as a sequence, read only when a setting picks them."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset.image(int(i))
