"""`visae convert` (peers' SAE checkpoints into visae's, visae's into SAELens's) and
`visae sae list` (published vision SAEs that `SAE.load` opens by name)."""

from __future__ import annotations

import argparse
from typing import Any


def add_sae_commands(sub: Any) -> None:
    from visae.sae.convert import FORMATS

    p = sub.add_parser(
        "convert",
        help="import an SAE checkpoint of saev, SAELens, dictionary_learning, sparsify or "
        "overcomplete into visae's format, or export a visae SAE to SAELens's",
    )
    p.add_argument("source", help="the checkpoint folder or file (a visae SAE with --to saelens)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--from", dest="source_format", choices=FORMATS, help="default: detected")
    p.add_argument(
        "--to", choices=("visae", "saelens"), default="visae", help="the format to write"
    )
    p.add_argument(
        "--arch",
        choices=("relu", "topk"),
        help="overcomplete only: its state dict does not say its SAE's class",
    )
    p.add_argument("--k", type=int, help="overcomplete TopK only: active latents per token")
    p.set_defaults(handler=run_convert)
    sae = sub.add_parser("sae", help="published SAEs that visae opens by name")
    ssub = sae.add_subparsers(dest="sae_command", required=True, metavar="ACTION")
    p = ssub.add_parser("list", help="published vision SAEs: name, hub repo, backbone, layer")
    p.set_defaults(handler=run_list)


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from visae.sae.convert import export_saelens, import_sae
    from visae.sae.model import SAE

    if args.to == "saelens":
        source = Path(args.source)
        is_visae = (source / "config.json").is_file() and (source / "model.safetensors").is_file()
        sae = (
            SAE.load(source)
            if is_visae
            else import_sae(source, None, args.source_format, args.arch, args.k)
        )
        meta = sae.checkpoint_info.get("metadata", {}) if is_visae else {}
        export_saelens(sae, args.out, {"visae_source": str(source.resolve())} | _hook(sae, meta))
        print(f"SAELens SAE written to {args.out} ({sae.cfg.arch}, {sae.n_latents} latents)")
        return 0
    import_sae(args.source, args.out, args.source_format, args.arch, args.k)
    loaded = SAE.load(args.out)
    fmt = loaded.checkpoint_info.get("metadata", {}).get("provenance", {}).get("format")
    print(
        f"visae SAE written to {args.out}: {loaded.cfg.arch}"
        + (
            f" (k={loaded.cfg.k}{', signed' if loaded.cfg.signed_topk else ''})"
            if loaded.cfg.arch in ("topk", "batchtopk")
            else ""
        )
        + f", d={loaded.d}, {loaded.n_latents} latents"
        + (f", from {fmt}" if fmt else "")
    )
    return 0


def _hook(sae: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """What SAELens calls the model and hook, from the visae checkpoint's record."""
    info = sae.checkpoint_info
    store = info.get("store") or {}
    out: dict[str, Any] = {}
    if store.get("backbone"):
        out["model_name"] = store["backbone"]
    if info.get("layer") is not None:
        out["hook_name"] = f"visae.layer.{info['layer']}"
    return out | {k: v for k, v in meta.items() if isinstance(v, str | int | float)}


def run_list(args: argparse.Namespace) -> int:
    from visae.sae.published import rows

    for r in rows():
        state = "converted here" if r["cached"] else "needs a download"
        print(
            f"{r['name']:<22} {r['repo']}/{r['file']}  {r['format']}, {r['arch']} "
            f"{r['n_latents']} latents, {r['backbone']} layer {r['layer']} ({r['tokens']} "
            f"tokens); {state}"
        )
    return 0
