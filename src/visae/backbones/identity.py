"""Model identity: a hash of the weights, so an artifact can say exactly which model made it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict: every entry in sorted name order, as name, dtype, shape and
    raw bytes. Buffers (e.g. BatchNorm statistics) are included because they change outputs.
    Floating tensors are hashed as float32, so a model loaded in half precision (a hub VLM on a
    GPU) has the hash of the same weights upcast, as visae's backbones load them."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
