"""T5's cross-attention on a CPU, forward + backward at its bench shapes (32 examples, 26 decoder tokens attending to
116 encoder states, width 256, 4 heads, no dropout, padding in half the examples), from the decoder's queries to the
merged heads: the encoder's states projected into keys and values and kept for the backward pass (as with a decoding
cache), projected again in the backward pass instead (`ProjectedInBackward`, T5 before stop 54), and attended to in
their own space with nothing projected (`MemorySpaceAttention`). Prints the median of 20 interleaved repeats of each,
the multiply-adds each makes, and the largest difference between each one's gradients and the kept projection's.
Run: python tests/bench/cross_attention.py"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from backward_timing import time_backward

from ptmcli.models.attention import CrossAttention, _merge_heads
from ptmcli.models.memory_attention import MemorySpaceAttention
from ptmcli.models.recompute import ProjectedInBackward

B, T, S, C, HEADS = 32, 26, 116, 256, 4


def main() -> None:
    torch.manual_seed(0)
    cross = CrossAttention(C, HEADS, 0.0, bias=False, scale=1.0)
    query = torch.randn(B, T, C, requires_grad=True)
    memory = torch.randn(B, S, C, requires_grad=True)
    allowed = torch.ones(B, 1, 1, S, dtype=torch.bool)
    allowed[B // 2 :, :, :, S - 8 :] = False
    weight = cross.kv.weight
    attend = functools.partial(cross._attend, mask=allowed)
    merged = functools.partial(_merge_heads, rows=None)

    ways = {
        "projected, kept": lambda: merged(attend(query, F.linear(memory, weight))),
        "projected again": lambda: merged(ProjectedInBackward.apply(attend, query, memory, weight, None)),
        "memory's space": lambda: MemorySpaceAttention.apply(query, memory, weight, allowed, HEADS, 1.0),
    }
    results = time_backward(ways, torch.randn(B, T, C), [query, memory, weight], repeats=20, warmup=3)
    # multiply-adds an example, forward: keys and values, then the scores and weighted values of all heads; in the
    # space: the queries into it and the sums out of it, then the scores and sums at full width for each head
    projected = 2 * S * C * C + 2 * T * S * C
    in_space = 2 * T * C * C + 2 * HEADS * T * S * C
    macs = {
        "projected, kept": 3 * projected,  # the backward pass: twice the forward's products
        "projected again": 4 * projected,  # and the forward's again
        "memory's space": 7 * in_space // 2,  # ten products backward, two of them the forward's again
    }
    for name, (seconds, _) in results.items():
        print(f"{name:16} {seconds * 1e3:5.1f} ms   {B * macs[name] / 1e9:.2f} G multiply-adds")
    (_, theirs), *ours = results.values()
    for name, (_, grads) in zip(list(ways)[1:], ours):
        difference = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads, theirs))
        print(f"largest gradient difference, {name} against the kept projection: {difference:.1e} of the largest")


if __name__ == "__main__":
    main()
