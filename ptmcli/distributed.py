"""Process-group helpers. Under `torchrun` every process runs the same code; without it, world size is 1."""

from __future__ import annotations

import atexit
import os
import sys
import threading
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
    """Leave the process group (every command does, in `main`); a torchrun worker then ends as `end_worker` says."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_worker(status: int | str | None) -> None:
    """End a process torchrun started (WORLD_SIZE > 1) without the interpreter's teardown; elsewhere, return.

    DDP and FSDP keep the process group alive past `close`, so its gloo threads run on, and one drops its last
    reference to a collective's tensors a moment after the collective returned. When that moment falls in the
    interpreter's teardown, the thread cannot take the GIL to free a tensor's Python object and the process aborts
    ("terminate called without an active exception", SIGABRT) after a run that had finished and written everything:
    once in CI on a loaded 2-core machine, in about 3 runs of 4 with a collective in flight at exit. So the group is
    left, non-daemon threads are waited for, exit handlers run and output is flushed -- all a normal exit does that
    matters here -- and the process ends with `status` (as `sys.exit` reads it) before the teardown starts."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    close()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    if isinstance(status, str):
        print(status, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status if isinstance(status, int) else 0 if status is None else 1)


def broadcast_str(value: str) -> str:
    """Rank 0's value of a string on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
