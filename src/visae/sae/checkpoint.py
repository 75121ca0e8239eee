"""SAE checkpoints: a directory with `config.json` and `model.safetensors`, no pickle.

config.json holds the schema version, the visae version, the architecture and every
hyperparameter, the input normalisation (exact: float32 values survive JSON's float64), the
tokens seen, and the store identity and layer the SAE was trained on. model.safetensors holds
the parameters and the training state (dead-latent counters, BatchTopK's threshold).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import visae
from visae.errors import VisaeError
from visae.sae.config import ARCHITECTURES, SAEConfig
from visae.sae.model import SAE

SCHEMA_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_checkpoint(
    sae: SAE,
    path: Path,
    *,
    store: dict[str, Any] | None,
    layer: int | None,
    metadata: dict[str, Any],
) -> Path:
    """Write the checkpoint; each file goes to a temporary name first, config.json last."""
    if path.exists() and not path.is_dir():
        raise VisaeError(f"cannot save SAE checkpoint: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "schema_version": SCHEMA_VERSION,
        "visae_version": visae.__version__,
        "architecture": sae.cfg.arch,
        "config": sae.cfg.to_dict(),
        "normalization": {
            "mean": sae.norm_mean.tolist(),
            "scale": float(sae.norm_scale),
        },
        "tokens_seen": int(sae.tokens_seen),
        "store": store,
        "layer": layer,
        "metadata": metadata,
    }
    try:
        text = json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise VisaeError(f"SAE checkpoint metadata is not JSON-serialisable: {exc}") from exc
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    weights_tmp = path / f".{WEIGHTS_NAME}.tmp"
    save_file(
        tensors, str(weights_tmp), metadata={"format": "pt", "visae_schema": str(SCHEMA_VERSION)}
    )
    os.replace(weights_tmp, path / WEIGHTS_NAME)
    config_tmp = path / f".{CONFIG_NAME}.tmp"
    config_tmp.write_text(text + "\n")
    os.replace(config_tmp, path / CONFIG_NAME)
    return path


def load_checkpoint(
    path_or_repo_id: str | Path,
    *,
    revision: str | None,
    cache_dir: str | Path | None,
    local_files_only: bool,
) -> SAE:
    """Resolve a local directory or hub repo id to a directory, then load it."""
    directory = _resolve(str(path_or_repo_id), revision, cache_dir, local_files_only)
    return load_directory(directory)


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
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
        )
    except Exception as exc:  # hub errors come in many types; one clear line for the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VisaeError(
            f"could not fetch SAE checkpoint {spec!r} from the hub: {first_line}"
        ) from exc
    return Path(downloaded)


def load_directory(directory: Path) -> SAE:
    """Load and validate one checkpoint directory."""
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise VisaeError(f"{directory} is not an SAE checkpoint: {CONFIG_NAME} is missing")
    if not weights_path.is_file():
        raise VisaeError(f"{directory} is not an SAE checkpoint: {WEIGHTS_NAME} is missing")
    try:
        info = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VisaeError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise VisaeError(f"{config_path} must hold a JSON object")
    schema = info.get("schema_version")
    if not isinstance(schema, int):
        raise VisaeError(f"{config_path} has no integer schema_version")
    if schema > SCHEMA_VERSION:
        raise VisaeError(
            f"{config_path} has schema version {schema}, newer than this visae "
            f"({visae.__version__}) reads ({SCHEMA_VERSION}); upgrade visae"
        )
    arch = info.get("architecture")
    if arch not in ARCHITECTURES:
        raise VisaeError(
            f"{config_path}: unknown SAE architecture {arch!r}; expected one of {ARCHITECTURES}"
        )
    config_dict = info.get("config")
    if not isinstance(config_dict, dict):
        raise VisaeError(f"{config_path} has no 'config' object")
    try:
        cfg = SAEConfig.from_dict(config_dict)
    except VisaeError as exc:
        raise VisaeError(f"{config_path}: {exc}") from exc
    if cfg.arch != arch:
        raise VisaeError(
            f"{config_path}: architecture {arch!r} disagrees with config arch {cfg.arch!r}"
        )

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise VisaeError(f"cannot read {weights_path}: {exc}") from exc
    sae = SAE.create(cfg)
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise VisaeError(
            f"{weights_path} does not match a {arch} SAE: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for name, reference in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(reference.shape):
            raise VisaeError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)} but config.json says "
                f"d={cfg.d}, n_latents={cfg.n_latents} (expected {tuple(reference.shape)})"
            )
    sae.to(tensors["W_enc"].dtype)
    sae.load_state_dict(tensors, strict=True)

    normalization = info.get("normalization") or {}
    mean = normalization.get("mean")
    scale = normalization.get("scale")
    if not isinstance(mean, list) or not isinstance(scale, int | float):
        raise VisaeError(f"{config_path} has no normalization mean/scale")
    sae.set_normalization(torch.tensor(mean, dtype=sae.W_enc.dtype), float(scale))
    sae.tokens_seen.fill_(int(info.get("tokens_seen", 0)))
    sae.checkpoint_info = {
        "path": str(directory),
        "schema_version": schema,
        "visae_version": info.get("visae_version"),
        "store": info.get("store"),
        "layer": info.get("layer"),
        "metadata": info.get("metadata") or {},
    }
    return sae
