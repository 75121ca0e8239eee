"""Training and sweep configuration: one dataclass per concern, read from CLI flags or a
TOML/JSON file, validated before any data is touched."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visae.errors import VisaeError
from visae.sae import ARCHS, SAEConfig
from visae.train.schedule import LR_DECAYS

BEYOND_EPOCH = ("continue", "stop")
# How the ranks of a torchrun job share a sweep: every SAE on its rows of each batch
# ("batch", data-parallel), or each rank some of the SAEs on the whole stream ("runs").
PARALLEL = ("batch", "runs")


@dataclass
class TrainConfig:
    """How the shared stream is read and every run is scheduled, evaluated and saved."""

    store: str = ""
    out: str = "runs/train"
    layer: int | None = None  # None: the store's only layer, or its last
    tokens: str = "patch"
    batch_size: int = 4096
    total_tokens: int | None = None  # None: one epoch of the training images
    beyond_epoch: str = "continue"  # when total_tokens exceeds one epoch: continue or stop
    lr_warmup_steps: int = 200
    lr_decay: str = "cosine"
    lr_decay_start: float = 0.8
    sparsity_warmup_steps: int = 500
    holdout_fraction: float = 0.05  # images held out for evaluation
    eval_every_tokens: int = 1_000_000
    eval_tokens: int = 65_536
    checkpoint_every_tokens: int = 5_000_000
    norm_sample_tokens: int = 65_536
    # a latent is dead after this fraction of the run without firing, capped by each SAE's
    # own dead_after_tokens (Gao et al.'s 10M tokens): dead tracking and AuxK act in short runs
    dead_window_fraction: float = 0.1
    prefetch: int = 2
    device: str = "cpu"
    parallel: str = "batch"  # under torchrun: "batch" (data-parallel) or "runs" (SAEs per rank)
    seed: int = 0

    def validate(self) -> None:
        if not self.store:
            raise VisaeError("no activation store given to train on")
        for name in (
            "batch_size",
            "eval_every_tokens",
            "eval_tokens",
            "checkpoint_every_tokens",
            "norm_sample_tokens",
        ):
            if int(getattr(self, name)) < 1:
                raise VisaeError(f"{name} must be a positive integer, not {getattr(self, name)}")
        if self.total_tokens is not None and self.total_tokens < 1:
            raise VisaeError(f"total_tokens must be positive, not {self.total_tokens}")
        if self.tokens not in ("patch", "cls", "all"):
            raise VisaeError(f"tokens must be patch, cls or all, not {self.tokens!r}")
        if self.parallel not in PARALLEL:
            raise VisaeError(f"parallel must be one of {PARALLEL}, not {self.parallel!r}")
        if self.beyond_epoch not in BEYOND_EPOCH:
            raise VisaeError(
                f"beyond_epoch must be one of {BEYOND_EPOCH}, not {self.beyond_epoch!r}"
            )
        if self.lr_decay not in LR_DECAYS:
            raise VisaeError(f"lr_decay must be one of {LR_DECAYS}, not {self.lr_decay!r}")
        if not 0 <= self.lr_decay_start <= 1:
            raise VisaeError(f"lr_decay_start must be in [0, 1], not {self.lr_decay_start}")
        if not 0 <= self.holdout_fraction < 1:
            raise VisaeError(f"holdout_fraction must be in [0, 1), not {self.holdout_fraction}")
        if self.lr_warmup_steps < 0 or self.sparsity_warmup_steps < 0:
            raise VisaeError("warm-up step counts must be >= 0")
        if not 0 < self.dead_window_fraction <= 1:
            raise VisaeError(
                f"dead_window_fraction must be in (0, 1], not {self.dead_window_fraction}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_lr(n_latents: int) -> float:
    """2e-4 / sqrt(n_latents / 2^14), the scaling rule common in the SAE literature."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


@dataclass
class RunSpec:
    """One SAE of a sweep: a name (its output folder), its config and its learning rate."""

    name: str
    sae: SAEConfig
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "sae": self.sae.to_dict()}


SAE_FIELDS = {f.name for f in dataclasses.fields(SAEConfig)}


@dataclass
class SweepEntry:
    """SAE settings where any value may be a list; the entry expands to their product."""

    values: dict[str, Any] = field(default_factory=dict)

    def expand(self, d: int) -> list[RunSpec]:
        keys = sorted(self.values)
        unknown = [k for k in keys if k not in SAE_FIELDS | {"lr", "name", "expansion"}]
        if unknown:
            raise VisaeError(f"unknown SAE setting(s) in sweep: {', '.join(unknown)}")
        grids = [v if isinstance(v, list) else [v] for v in (self.values[k] for k in keys)]
        runs = []
        for combo in itertools.product(*grids):
            chosen = dict(zip(keys, combo, strict=True))
            name = chosen.pop("name", None)
            lr = chosen.pop("lr", None)
            expansion = chosen.pop("expansion", None)
            if expansion is not None and "n_latents" in chosen:
                raise VisaeError(
                    "give the dictionary size as n_latents or as expansion, not both "
                    f"(n_latents={chosen['n_latents']}, expansion={expansion})"
                )
            if "n_latents" not in chosen:
                chosen["n_latents"] = round(d * (expansion or 16))
            if "d" in chosen and chosen["d"] != d:
                raise VisaeError(f"SAE width d={chosen['d']} does not match the store's d={d}")
            chosen["d"] = d
            cfg = SAEConfig(**chosen)
            runs.append(RunSpec(name or run_name(cfg, lr), cfg, lr or default_lr(cfg.n_latents)))
        return runs


def run_name(cfg: SAEConfig, lr: float | None) -> str:
    """A readable, unique-enough folder name for a run."""
    parts = [cfg.arch]
    if cfg.matryoshka:
        parts.append("matryoshka")
    parts.append(f"n{cfg.n_latents}")
    uses = ARCHS.get(cfg.arch).uses
    if "k" in uses:
        parts.append(f"k{cfg.k}")
    elif "l1_coeff" in uses:
        parts.append(f"l1{cfg.l1_coeff:g}")
    else:
        parts.append(f"l0{cfg.l0_coeff:g}-t{cfg.jumprelu_target_l0}")
    if lr is not None:
        parts.append(f"lr{lr:g}")
    if cfg.compute_dtype != "float32":
        parts.append(cfg.compute_dtype)
    return "-".join(parts)


def expand_runs(entries: list[SweepEntry], d: int) -> list[RunSpec]:
    """Every run of a sweep; duplicate names are refused (they would share a folder)."""
    runs = [run for entry in entries for run in entry.expand(d)]
    if not runs:
        raise VisaeError("the sweep defines no SAE to train")
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VisaeError(f"two runs of the sweep share the name {dupes[0]!r}; give them names")
    return runs


def load_sweep_file(path: str | Path) -> tuple[dict[str, Any], list[SweepEntry]]:
    """Read a TOML or JSON sweep: a `[train]` table and `[[sae]]` entries."""
    p = Path(path)
    if not p.is_file():
        raise VisaeError(f"sweep config {p} does not exist")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise VisaeError(f"cannot parse sweep config {p}: {exc}") from None
    unknown = sorted(set(data) - {"train", "sae"})
    if unknown:
        raise VisaeError(f"sweep config {p}: unknown section(s) {', '.join(unknown)}")
    train = data.get("train", {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(train) - known)
    if bad:
        raise VisaeError(f"sweep config {p}: unknown [train] setting(s) {', '.join(bad)}")
    entries = data.get("sae", [])
    if isinstance(entries, dict):
        entries = [entries]
    return train, [SweepEntry(dict(e)) for e in entries]
