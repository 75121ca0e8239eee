"""`visae probe train` and `visae probe info`: linear probes on a store's frozen features. The
training flags are derived from `ProbeConfig`'s fields (their help is the field's), so the CLI
and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from visae.heads.probes import OPTIMIZERS, PROBE_KINDS, ProbeConfig, load_probe, train_probe

_CHOICES: dict[str, tuple[str, ...]] = {"kind": PROBE_KINDS, "optimizer": OPTIMIZERS}
_TYPES: dict[str, type] = {
    "layer": int,
    "concepts": str,
    "prefix": str,
    "depth": int,
    "steps": int,
    "lr": float,
}


def add_probe_arguments(subparsers: Any) -> None:
    """Add `visae probe` with its actions `train` and `info` to the top-level subparsers."""
    parser = subparsers.add_parser(
        "probe",
        help="linear probes on a store's frozen features (CLS concepts, patch segmentation)",
    )
    actions = parser.add_subparsers(dest="probe_command", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train",
        help="train a probe on a store against a concept source; held-out metrics",
        description="Train a linear probe on a store's tokens (no backbone forward): cls, "
        "one logistic output per concept on the CLS token; patch, a softmax over background "
        "and object classes per patch token. Writes probe.json and model.safetensors.",
    )
    train.add_argument("store", help="activation store")
    train.add_argument("--out", required=True, help="probe folder to write")
    for f in dataclasses.fields(ProbeConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name in _CHOICES:
            train.add_argument(flag, choices=_CHOICES[f.name], default=f.default, help=help_text)
        elif f.type in ("bool", bool):
            train.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            kind = _TYPES.get(f.name, type(f.default))
            train.add_argument(flag, type=kind, default=f.default, help=help_text)
    train.add_argument("--dataset", help="dataset spec of the store's images (default: its own)")
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=run_probe_train)
    info = actions.add_parser("info", help="summarise a probe folder: classes and metrics")
    info.add_argument("probe", help="probe folder")
    info.set_defaults(handler=run_probe_info)


def run_probe_train(args: argparse.Namespace) -> int:
    config = ProbeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeConfig)})
    result = train_probe(
        args.store,
        config,
        args.out,
        progress=not args.quiet,
        dataset=args.dataset,
        device=args.device,
    )
    print(result.summary())
    return 0


def run_probe_info(args: argparse.Namespace) -> int:
    print(load_probe(args.probe).summary())
    return 0
