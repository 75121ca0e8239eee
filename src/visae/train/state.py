"""Training checkpoints: every run's SAE and optimizer state plus the stream position, written
as one folder that replaces the previous one atomically. No pickle: tensors go to
safetensors, scalars to JSON."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from visae.atomic import atomic_directory, recover_directory, write_bytes, write_text
from visae.dist import Ranks
from visae.errors import VisaeError
from visae.sae import SAE

CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def optimizer_tensors(sae: SAE, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state, keyed by parameter name."""
    names = {id(p): n for n, p in sae.named_parameters()}
    out = {}
    for param, state in opt.state.items():
        for key, value in state.items():
            out[f"{names[id(param)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(
    sae: SAE, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    for name, param in sae.named_parameters():
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}
        if state:
            opt.state[param] = {k: v.to(param.device) for k, v in state.items()}


def save_training_checkpoint(
    out: Path,
    state: dict[str, Any],
    runs: dict[str, tuple[SAE, torch.optim.Optimizer]],
    sae_metadata: dict[str, Any],
    ranks: Ranks | None = None,
) -> None:
    """Write `out/checkpoint` for every run at the same step; a crash at any moment leaves
    either the previous checkpoint or this one, never a mix (see `visae.atomic`).

    With the `ranks` of a job whose ranks hold different runs, each rank writes its own runs
    into the one new folder, and rank 0 swaps it in once every rank has."""
    ranks = ranks or Ranks()
    with contextlib.ExitStack() as stack:
        new = Path(
            ranks.from_main(lambda: str(stack.enter_context(atomic_directory(out / CHECKPOINT))))
        )
        for name, (sae, opt) in runs.items():
            sae.save(new / name / "sae", **sae_metadata)
            write_bytes(new / name / OPTIMIZER_FILE, save(optimizer_tensors(sae, opt)))
        ranks.barrier()
        if ranks.main:
            write_text(new / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint folder, if any (repairing what a kill mid-swap left)."""
    final = out / CHECKPOINT
    recover_directory(final)
    return final if final.is_dir() else None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The stream position a checkpoint folder was written at."""
    try:
        state: dict[str, Any] = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VisaeError(f"cannot read training checkpoint {ckpt / STATE_FILE}: {exc}") from None
    return state


def load_training_checkpoint(
    ckpt: Path, names: list[str]
) -> tuple[dict[str, Any], dict[str, tuple[SAE, dict[str, torch.Tensor]]]]:
    """(stream state, {run: (SAE, optimizer tensors)}) from a checkpoint folder."""
    state = read_state(ckpt)
    runs = {}
    for name in names:
        if not (ckpt / name).is_dir():
            raise VisaeError(f"training checkpoint {ckpt} has no run {name!r}")
        try:
            tensors = load_file(str(ckpt / name / OPTIMIZER_FILE))
        except (OSError, SafetensorError) as exc:
            raise VisaeError(f"cannot read {ckpt / name / OPTIMIZER_FILE}: {exc}") from None
        runs[name] = (SAE.load(ckpt / name / "sae"), tensors)
    return state, runs
