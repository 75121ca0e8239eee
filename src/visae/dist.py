"""The processes of one job launched by `torchrun` (or Slurm through it): who this one is, and
the few collectives visae's extraction and training need, on `torch.distributed`.

A plain `python -m visae ...` is one process of a world of one: every collective is then the
identity and nothing touches `torch.distributed`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from visae.errors import VisaeError

T = TypeVar("T")

# The gloo group of the job (all ranks) for barriers and Python objects, whatever backend the
# tensors' collectives take: so that neither needs a GPU chosen, nor sends objects through one.
_HOST_GROUP: list[Any] = []

# How long a rank waits for the others at a collective before failing (a slow rank 0 writing a
# checkpoint or validating a large store must not time the others out; a dead one is caught
# sooner by torchrun, which stops the whole job when any rank exits).
TIMEOUT = datetime.timedelta(minutes=60)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise VisaeError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: `rank` of `world`, `local_rank` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes what there is one of (manifests, checkpoints, logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def label(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=_host_group())

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor; the input is left as it is)."""
        return self._reduced(tensor, dist.ReduceOp.SUM)

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduced(tensor, dist.ReduceOp.MIN)

    def _reduced(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.distributed:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=op)
        return out

    def all_cat(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values` (of any lengths) concatenated in rank order."""
        if not self.distributed:
            return values
        n = torch.tensor([values.numel()], device=values.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(int(s) for s in sizes))
        padded = values.new_zeros(longest)
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    def main_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on every rank, rank 0 first: what fills a shared cache (a dataset rendered,
        a model converted) is written once, then read by the others."""
        if not self.distributed:
            return fn()
        if self.main:
            value = fn()
            self.barrier()
            return value
        self.barrier()
        return fn()

    def from_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on rank 0 only, its result (or its error) given to every rank: so that a
        store or folder refused by rank 0 stops every rank with rank 0's one-line message
        instead of leaving them waiting."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except VisaeError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0, group=_host_group())
        status, value = box[0]
        if status == "error":
            raise VisaeError(value)
        return value


def _host_group() -> Any:
    """The gloo group made by `current()` (None, the default group, for a process group that
    someone else set up)."""
    return _HOST_GROUP[0] if _HOST_GROUP else None


def current() -> Ranks:
    """The job this process belongs to, from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK), joining its process group on first use: gloo for CPU tensors and, where CUDA
    is available, NCCL for GPU ones."""
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        return Ranks()
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or not 0 <= rank < world:
        raise VisaeError(f"WORLD_SIZE={world} but RANK is {os.environ.get('RANK')!r}")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        _HOST_GROUP.append(dist.new_group(backend="gloo", timeout=TIMEOUT))
    return Ranks(rank=rank, world=world, local_rank=local or 0)


def local_device(name: str, ranks: Ranks) -> str:
    """The device a rank computes on: "cuda" alone means this rank's own GPU (LOCAL_RANK), so
    that `torchrun --nproc-per-node N` on an N-GPU node puts one rank on each."""
    if ranks.distributed and name == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        return f"cuda:{ranks.local_rank}"
    if ranks.distributed and name.startswith("cuda:"):
        raise VisaeError(
            f"device {name!r} would put every rank on one GPU: under torchrun pass --device "
            "cuda (each rank takes its LOCAL_RANK's GPU) or restrict CUDA_VISIBLE_DEVICES"
        )
    return name
