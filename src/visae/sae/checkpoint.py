"""The SAE checkpoint format: a directory with `config.json` and `model.safetensors`, no pickle.

config.json holds the schema version, the visae version, the architecture and every
hyperparameter, the input normalisation (exact: float32 values survive JSON's float64), the
tokens seen, and the store identity and layer the SAE was trained on. model.safetensors holds
the parameters and the training state (dead-latent counters, BatchTopK's threshold).

This module knows the files, not the `SAE` class: `SAE.save` hands it plain tensors and values,
and `SAE.load` builds the SAE from what `read_checkpoint` returns. So nothing here imports the
model, and the model's `save`/`load` can import this module without a cycle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

import visae
from visae.atomic import atomic_directory, is_tmp_name, write_bytes, write_text
from visae.errors import VisaeError, first_line
from visae.sae.config import SAEConfig
from visae.sae.registry import ARCHS

SCHEMA_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass
class CheckpointContents:
    """Everything a checkpoint directory holds, validated against the format (not yet against
    an SAE: `SAE.load` checks the tensors' names and shapes)."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    norm_mean: list[float]
    norm_scale: float
    tokens_seen: int
    info: dict[str, Any] = field(default_factory=dict)


def write_checkpoint(
    path: Path,
    *,
    cfg: SAEConfig,
    tensors: dict[str, Tensor],
    norm_mean: list[float],
    norm_scale: float,
    tokens_seen: int,
    store: dict[str, Any] | None,
    layer: int | None,
    metadata: dict[str, Any],
) -> Path:
    """Write the checkpoint directory `path` whole: both files are built in a temporary sibling
    folder (each fsynced) that is then swapped in, so a kill at any moment leaves either the
    previous checkpoint or this one, and a full disk is a one-line error that leaves the
    previous checkpoint in place. A folder holding anything else is never replaced."""
    _check_replaceable(path)
    config = {
        "schema_version": SCHEMA_VERSION,
        "visae_version": visae.__version__,
        "architecture": cfg.arch,
        "config": cfg.to_dict(),
        "normalization": {"mean": norm_mean, "scale": norm_scale},
        "tokens_seen": tokens_seen,
        "store": store,
        "layer": layer,
        "metadata": metadata,
    }
    try:
        text = json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise VisaeError(f"SAE checkpoint metadata is not JSON-serialisable: {exc}") from None
    data = safetensors_bytes(
        {name: t.detach().contiguous().cpu() for name, t in tensors.items()},
        metadata={"format": "pt", "visae_schema": str(SCHEMA_VERSION)},
    )
    with atomic_directory(path) as tmp:
        write_bytes(tmp / WEIGHTS_NAME, data)
        write_text(tmp / CONFIG_NAME, text + "\n")
    return path


def _check_replaceable(path: Path) -> None:
    """Refuse a destination that is a file, or a folder with anything but a checkpoint's files
    (a typo must never replace someone's run folder)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise VisaeError(f"cannot save SAE checkpoint: {path} exists and is not a directory")
    own = set(OWN_FILES)
    foreign = sorted(
        name
        for name in os.listdir(path)
        if name not in own and not (is_tmp_name(name) and name[1:].rsplit(".", 1)[0] in own)
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise VisaeError(
            f"refusing to replace {path}: it holds {shown}, not part of an SAE checkpoint"
        )


def read_checkpoint(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> CheckpointContents:
    """Resolve a local directory or hub repo id to a directory, then read it."""
    directory = _resolve(str(path_or_repo_id), revision, cache_dir, local_files_only)
    return read_directory(directory)


def _looks_local(spec: str) -> bool:
    """True when `spec` must be a path: a hub id is exactly "owner/name" and "owner" is not a
    local directory."""
    if spec.startswith((".", "/", "~", "\\")) or spec.count("/") != 1:
        return True
    return Path(spec).parent.is_dir()


def _resolve(
    spec: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool
) -> Path:
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise VisaeError(f"{spec} is a file; an SAE checkpoint is a directory")
    if _looks_local(spec):
        raise VisaeError(f"no SAE checkpoint directory at {spec}")
    from huggingface_hub import snapshot_download

    try:
        downloaded = snapshot_download(
            spec,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=list(OWN_FILES),
        )
    except Exception as exc:  # hub errors come in many types; one clear line for the user
        raise VisaeError(
            f"could not fetch SAE checkpoint {spec!r} from the hub: {first_line(exc)}"
        ) from None
    return Path(downloaded)


def _migrate_v1(config: dict[str, Any]) -> None:
    """Schema 1 -> 2: JumpReLU's fixed initial threshold gave way to a target L0. Both only
    matter for initialisation (a loaded SAE keeps its learnt thresholds), so the old field is
    dropped and the target set to the default, or below the width of a small SAE."""
    config.pop("jumprelu_threshold_init", None)
    n_latents = config.get("n_latents")
    default = SAEConfig.jumprelu_target_l0
    if isinstance(n_latents, int) and n_latents > 1:
        config.setdefault("jumprelu_target_l0", min(default, n_latents - 1))


def read_directory(directory: Path) -> CheckpointContents:
    """Read and validate one checkpoint directory."""
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise VisaeError(f"{directory} is not an SAE checkpoint: {CONFIG_NAME} is missing")
    if not weights_path.is_file():
        raise VisaeError(f"{directory} is not an SAE checkpoint: {WEIGHTS_NAME} is missing")
    try:
        info = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VisaeError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise VisaeError(f"{config_path} must hold a JSON object")
    schema = info.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise VisaeError(f"{config_path} has no positive integer schema_version")
    if schema > SCHEMA_VERSION:
        raise VisaeError(
            f"{config_path} has schema version {schema}, newer than this visae "
            f"({visae.__version__}) reads ({SCHEMA_VERSION}); upgrade visae"
        )
    arch = info.get("architecture")
    if arch not in ARCHS:
        raise VisaeError(
            f"{config_path}: unknown SAE architecture {arch!r}; expected one of {ARCHS.names()}"
        )
    config_dict = info.get("config")
    if not isinstance(config_dict, dict):
        raise VisaeError(f"{config_path} has no 'config' object")
    if schema == 1:
        _migrate_v1(config_dict)
    try:
        cfg = SAEConfig.from_dict(config_dict)
    except VisaeError as exc:
        raise VisaeError(f"{config_path}: {exc}") from None
    if cfg.arch != arch:
        raise VisaeError(
            f"{config_path}: architecture {arch!r} disagrees with config arch {cfg.arch!r}"
        )
    normalization = info.get("normalization") or {}
    mean = normalization.get("mean")
    scale = normalization.get("scale")
    if (
        not isinstance(mean, list)
        or not all(isinstance(v, int | float) for v in mean)
        or not isinstance(scale, int | float)
    ):
        raise VisaeError(f"{config_path} has no normalization mean/scale")
    tokens_seen = info.get("tokens_seen", 0)
    if not isinstance(tokens_seen, int) or tokens_seen < 0:
        raise VisaeError(f"{config_path}: tokens_seen={tokens_seen!r} must be an integer >= 0")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise VisaeError(f"cannot read {weights_path}: {exc}") from None
    return CheckpointContents(
        cfg=cfg,
        tensors=tensors,
        norm_mean=[float(v) for v in mean],
        norm_scale=float(scale),
        tokens_seen=tokens_seen,
        info={
            "path": str(directory),
            "schema_version": schema,
            "visae_version": info.get("visae_version"),
            "store": info.get("store"),
            "layer": info.get("layer"),
            "metadata": info.get("metadata") or {},
        },
    )
