"""Dropout whose masks are cheap on a CPU.

On a CPU, `torch.nn.Dropout` draws one Mersenne-Twister number per unit, serially: ~10 ms for a 32 x 128 x 256
activation, where the multiply it feeds takes 0.1 ms, and 8-13 % of a BART-mini or RoBERTa-mini training step
(`torch.profiler`, `aten::bernoulli_`). Here each call draws one seed from torch's generator (so
`torch.manual_seed`, checkpointed RNG state, exact resume and activation checkpointing's recompute see the
same masks) and takes 16 bits per unit from numpy's SFC64 stream for that seed, four units per 64-bit word.
The backward pass draws the same mask again from the seed rather than keeping it, so no mask is held between the
passes. A unit is dropped with probability p rounded to a multiple of 1/65,536 (0.1 -> 0.1000061), and the kept
ones are scaled by the exact inverse of the kept share, so the expectation is unchanged. On other devices
torch's own dropout runs (its counter-based masks are already fast there).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

UNITS = 65536  # 16 random bits per unit
SMALL = 65536  # below this many units torch's own masks cost less than this path's 0.1-0.4 ms of setup per call


def kept_scale(shape: torch.Size, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A `shape` tensor of 1 / (kept share) where a unit is kept and 0 where it is dropped, drawn from `seed`."""
    n = math.prod(shape)
    words = np.random.SFC64(seed).random_raw(-(-n // 4))  # (n/4,) uint64
    bits = torch.from_numpy(words.view(np.int16)[:n]).view(shape)  # uniform over [-32768, 32767]
    dropped = round(p * UNITS)
    kept = torch.empty(shape, dtype=dtype)
    torch.ge(bits, dropped - UNITS // 2, out=kept)  # 1.0 / 0.0 written straight into `dtype`: no bool pass
    return kept.mul_(UNITS / (UNITS - dropped))


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return kept_scale(x.shape, p, seed, x.dtype).mul_(x)  # into the mask's own buffer: one tensor less

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return kept_scale(grad.shape, ctx.p, ctx.seed, grad.dtype).mul_(grad), None, None


class _SeededDropoutMatmul(torch.autograd.Function):
    """dropout(weights) @ values keeping `weights` (which the softmax producing them keeps anyway) and not the
    dropped copy: the backward pass drops them again from the seed."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(weights, values)
        ctx.p, ctx.seed = p, seed
        return kept_scale(weights.shape, p, seed, weights.dtype).mul_(weights) @ values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, values = ctx.saved_tensors
        kept = kept_scale(weights.shape, ctx.p, ctx.seed, weights.dtype)
        grad_weights = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_weights = (grad @ values.transpose(-2, -1)).mul_(kept)
        if ctx.needs_input_grad[1]:
            grad_values = kept.mul_(weights).transpose(-2, -1) @ grad  # the mask's buffer now holds the dropped weights
        return grad_weights, grad_values, None, None


def _cheap(x: torch.Tensor, p: float) -> bool:
    return x.device.type == "cpu" and x.numel() >= SMALL and 0 < round(p * UNITS) < UNITS


def _seed() -> int:
    """One draw from torch's generator: what makes the masks follow `torch.manual_seed` and checkpointed RNG state."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_matmul(weights: torch.Tensor, values: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`dropout(weights, p, training) @ values`; on a CPU without keeping the dropped weights for the backward."""
    if not training or p == 0.0 or not _cheap(weights, p) or weights.shape[:-2] != values.shape[:-2]:
        return dropout(weights, p, training) @ values
    return _SeededDropoutMatmul.apply(weights, values, p, _seed())


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with cheap masks on a CPU."""
    if not training or p == 0.0:
        return x
    if not _cheap(x, p):
        return F.dropout(x, p, training)
    return _SeededDropout.apply(x, p, _seed())


class Dropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same place in a module tree, found by `isinstance(m, nn.Dropout)`), cheap on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
