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
from visae.train.recon import ReconReport, eval_recon
from visae.train.trainer import Trainer, heldout_from_record, resolve_layer, split_images, train

__all__ = [
    "ReconReport",
    "RunSpec",
    "SweepEntry",
    "TrainConfig",
    "Trainer",
    "default_lr",
    "eval_recon",
    "evaluate",
    "expand_runs",
    "heldout_from_record",
    "load_sweep_file",
    "resolve_layer",
    "split_images",
    "train",
]
