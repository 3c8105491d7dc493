"""Process-group helpers. Under `torchrun` every process runs the same code; without it, world size is 1."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor([float(flag)])).item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (a no-op for one process)."""
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values


def init_from_env() -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL for CUDA tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def close() -> None:
    """Leave the process group before the interpreter exits: gloo's worker threads still alive at exit abort the
    process ("terminate called without an active exception", SIGABRT) after a run that otherwise finished."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_str(value: str) -> str:
    """Rank 0's value of a string on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
