"""Which torch device a command computes on: one check, one clear error."""

from __future__ import annotations

import torch

from visae.errors import VisaeError


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:N", "mps") as a torch device that exists on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise VisaeError(f"unknown device {name!r} (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VisaeError(f"device {name!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise VisaeError(f"device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise VisaeError(f"device {name!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise VisaeError(f"device {name!r} is not supported (expected cpu, cuda, cuda:N or mps)")
    return device
