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


# torch.backends.cpu.get_cpu_capability() of CPUs where bf16/fp16 matmuls are emulated
# (measured on an AVX2 EPYC: DINOv2-S under bf16 autocast at 1/6 of the float32 speed, the
# SAE step's bf16 encoder matmul at 1/6 of float32; RESULTS.md)
_CPUS_WITHOUT_HALF_MATMUL = ("DEFAULT", "NO AVX", "AVX2")


def half_precision_is_emulated(device: str | torch.device) -> bool:
    """Whether bf16/fp16 matmuls on `device` run in software (a CPU without AVX-512), where
    they are several times slower than float32 instead of faster."""
    return (
        torch.device(device).type == "cpu"
        and torch.backends.cpu.get_cpu_capability() in _CPUS_WITHOUT_HALF_MATMUL
    )
