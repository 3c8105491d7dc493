"""The order in which examples are served, as a pure function of the micro-batch number.

Micro-batch k of the run is slice `rank` of global batch k, and global batch k is a fixed slice of a
seeded per-epoch permutation. Resuming at micro-batch k therefore needs only k (no data replay), and
N processes with batch B/N see exactly the examples that one process with batch B sees.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from ptmcli.errors import PtmError


class Examples(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: list[int], epoch: int) -> dict: ...


class BatchOrder:
    def __init__(self, num_examples: int, batch_size: int, world_size: int, rank: int, seed: int):
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_examples // self.global_batch
        self.num_examples = num_examples
        if self.batches_per_epoch == 0:
            raise PtmError(
                f"The training split has {num_examples} sequences, fewer than one global batch of "
                f"{self.global_batch} (trainer.batch_size x processes). Lower trainer.batch_size or use more data."
            )
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, k: int) -> tuple[int, list[int]]:
        """(epoch, example indices of this rank) for micro-batch k. The last partial global batch of an
        epoch is skipped; the next epoch's permutation puts those examples elsewhere."""
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        start = j * self.global_batch + self.rank * self.batch_size
        return epoch, self._perm[start : start + self.batch_size].tolist()


def train_batches(examples: Examples, order: BatchOrder, start: int) -> Iterator[dict]:
    """Collated micro-batches from micro-batch number `start` on, forever."""
    k = start
    while True:
        epoch, indices = order(k)
        yield examples.batch(indices, epoch)
        k += 1


def eval_batches(examples: Examples, batch_size: int, world_size: int, rank: int, max_batches: int) -> Iterator[dict]:
    """Validation in a fixed order with fixed masks (epoch 0); each rank takes every world_size-th batch.
    Examples may define `eval_ranges(batch_size)` to keep related features in one batch."""
    if hasattr(examples, "eval_ranges"):
        ranges = examples.eval_ranges(batch_size)
    else:
        ranges = [(s, min(s + batch_size, len(examples))) for s in range(0, len(examples), batch_size)]
    if max_batches:
        ranges = ranges[: max_batches * world_size]
    for start, stop in ranges[rank::world_size]:
        yield examples.batch(list(range(start, stop)), 0)
