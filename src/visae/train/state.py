"""Training checkpoints: every run's SAE and optimizer state plus the stream position, written
as one folder that replaces the previous one atomically. No pickle: tensors go to
safetensors, scalars to JSON."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from visae.errors import VisaeError
from visae.sae import SAE

CHECKPOINT = "checkpoint"
_NEW = ".checkpoint-new"
_OLD = ".checkpoint-old"
STATE_FILE = "state.json"


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
) -> None:
    """Write `out/checkpoint` for every run at the same step; a crash at any moment leaves
    either the previous checkpoint or this one, never a mix."""
    new, old, final = out / _NEW, out / _OLD, out / CHECKPOINT
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for name, (sae, opt) in runs.items():
        sae.save(new / name / "sae", **sae_metadata)
        save_file(optimizer_tensors(sae, opt), str(new / name / "optimizer.safetensors"))
    (new / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
    _fsync_tree(new)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint folder, recovering from a crash between the two renames."""
    shutil.rmtree(out / _NEW, ignore_errors=True)
    final, old = out / CHECKPOINT, out / _OLD
    if final.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        return final
    if old.is_dir():
        old.rename(final)
        return final
    return None


def load_training_checkpoint(
    ckpt: Path, names: list[str]
) -> tuple[dict[str, Any], dict[str, tuple[SAE, dict[str, torch.Tensor]]]]:
    """(stream state, {run: (SAE, optimizer tensors)}) from a checkpoint folder."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VisaeError(f"cannot read training checkpoint {ckpt / STATE_FILE}: {exc}") from None
    runs = {}
    for name in names:
        if not (ckpt / name).is_dir():
            raise VisaeError(f"training checkpoint {ckpt} has no run {name!r}")
        runs[name] = (
            SAE.load(ckpt / name / "sae"),
            load_file(str(ckpt / name / "optimizer.safetensors")),
        )
    return state, runs


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
