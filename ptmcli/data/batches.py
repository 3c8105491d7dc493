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


class MixtureOrder:
    """Batches drawn from several example sets (a multi-task run's tasks): global batch k comes whole from one set,
    picked by a seeded draw with probabilities `probs`, and is that set's next batch in its own BatchOrder. Batch k
    depends only on k (the draws are replayed from the seed), so resuming is exact and every process agrees."""

    BLOCK = 4096  # draws made at a time, each block from its own seed: the sequence does not depend on how far ahead

    def __init__(self, sizes: list[int], probs: list[float], batch_size: int, world_size: int, rank: int, seed: int):
        self.orders = [BatchOrder(n, batch_size, world_size, rank, seed * 1009 + i + 1) for i, n in enumerate(sizes)]
        self.offsets = np.cumsum([0, *sizes[:-1]])
        self.probs, self.seed = np.asarray(probs, dtype=float) / sum(probs), seed
        self.choices = np.empty(0, dtype=np.int64)  # which set each global batch comes from
        self.positions = np.empty(0, dtype=np.int64)  # the how-many-th batch of its set it is

    def _extend(self, k: int) -> None:
        while len(self.choices) <= k:
            block = len(self.choices) // self.BLOCK
            rng = np.random.default_rng([self.seed, 7_777, block])
            self.choices = np.concatenate([self.choices, rng.choice(len(self.probs), self.BLOCK, p=self.probs)])
        self.positions = np.zeros_like(self.choices)
        for i in range(len(self.orders)):
            chosen = np.flatnonzero(self.choices == i)
            self.positions[chosen] = np.arange(len(chosen))

    def __call__(self, k: int) -> tuple[int, list[int]]:
        if k >= len(self.choices):
            self._extend(k)
        which = int(self.choices[k])
        epoch, indices = self.orders[which](int(self.positions[k]))
        return epoch, [int(self.offsets[which]) + i for i in indices]


def train_batches(examples: Examples, order: BatchOrder | MixtureOrder, start: int) -> Iterator[dict]:
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
