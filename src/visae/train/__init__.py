"""Train many SAEs at once on one shuffled stream from an activation store, resumably;
evaluate reconstruction on any store."""

from visae.train.config import (
    RunSpec,
    SweepEntry,
    TrainConfig,
    default_lr,
    expand_runs,
    load_sweep_file,
)
from visae.train.metrics import evaluate
from visae.train.trainer import Trainer, resolve_layer, train

__all__ = [
    "RunSpec",
    "SweepEntry",
    "TrainConfig",
    "Trainer",
    "default_lr",
    "evaluate",
    "expand_runs",
    "load_sweep_file",
    "resolve_layer",
    "train",
]
