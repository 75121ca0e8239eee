"""`visae scenes`: the command-line face of the scene generator. Flags are derived from
`SceneConfig`'s fields so the CLI and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import time

from visae.data.scene_dataset import SceneDataset
from visae.data.scenes import OBJECT_SOURCES, SceneConfig, SceneGenerator, generate_scenes

_HELP = {
    "n_scenes": "number of base scenes",
    "size": "image side in pixels",
    "seed": "random seed (same seed, same bytes)",
    "objects": "object source: Tux Paint photos (stamps), procedural shapes, or auto",
    "min_objects": "fewest objects per scene",
    "max_objects": "most objects per scene",
    "pairs_per_kind": "pairs per edit kind (removal, swap, recolour, background)",
    "hue_shift_prob": "probability that a colourful object is hue-shifted",
    "background_weights": "relative frequency of photo, texture and plain backgrounds",
    "min_visible": "fraction of each object's pixels that must stay visible",
}


def add_scenes_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `visae scenes` flags (one per `SceneConfig` field, plus output options)."""
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    for f in dataclasses.fields(SceneConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "background_weights":
            parser.add_argument(
                flag, type=float, nargs=3, default=list(default), help=_HELP[f.name]
            )
        elif f.name == "objects":
            parser.add_argument(flag, choices=OBJECT_SOURCES, default=default, help=_HELP[f.name])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=_HELP[f.name])
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SceneConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SceneConfig)}
    values["background_weights"] = tuple(values["background_weights"])
    return SceneConfig(**values)


def run_scenes(args: argparse.Namespace) -> int:
    """Render a scene folder and print a one-paragraph summary."""
    config = config_from_args(args)
    gen = SceneGenerator(config)
    start = time.perf_counter()
    folder = generate_scenes(
        config,
        args.out,
        workers=args.workers,
        progress=not args.quiet,
        overwrite=args.overwrite,
        generator=gen,
    )
    seconds = time.perf_counter() - start
    ds = SceneDataset.load(folder)
    kinds = {}
    for p in ds.pairs:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    print(
        f"wrote {len(ds)} images ({config.n_scenes} scenes + {len(ds.pairs)} pair images: "
        + ", ".join(f"{n} {k}" for k, n in kinds.items())
        + f") to {folder} in {seconds:.1f} s ({len(ds) / seconds:.0f} images/s)\n"
        f"objects: {gen.stamps.name} ({len(gen.stamps)} items, "
        f"{len(gen.taxonomy.categories())} categories); {len(ds.concepts)} concepts; "
        f"fingerprint {ds.fingerprint[:16]}"
    )
    return 0
