"""Attention with an additive bias that needs a gradient (T5's position bias) on a CPU, forward + backward at T5's
bench shapes (32 sequences x 4 heads x 116 positions x 64): torch's SDPA, which runs its reference computation for
such a mask, against ptm's `models/attention.attention`, which writes the same computation out, and against
`BiasedAttention` (what T5's self-attention runs without dropout: from the fused projection, the weights rebuilt in
the backward pass; its output is merged back to (B, T, C), viewed here as heads again). Prints the median of 20
interleaved repeats of each and the largest difference between each one's gradients and SDPA's.
Run: python tests/bench/attention_bias.py"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from backward_timing import time_backward

from ptmcli.models.attention import attention
from ptmcli.models.recompute import BiasedAttention

B, HEADS, T, HEAD_SIZE = 32, 4, 116, 64


def main() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * HEADS * HEAD_SIZE, requires_grad=True)
    relative = torch.randn(1, HEADS, T, T, requires_grad=True)
    allowed = torch.ones(B, 1, 1, T, dtype=torch.bool)
    allowed[B // 2 :, :, :, T - 8 :] = False  # padding at the end of half the rows
    grad = torch.randn(B, HEADS, T, HEAD_SIZE)

    def heads():
        return [t.view(B, T, HEADS, HEAD_SIZE).transpose(1, 2) for t in qkv.split(HEADS * HEAD_SIZE, 2)]

    def biased() -> torch.Tensor:
        return relative.masked_fill(~allowed, float("-inf"))

    ways = {
        "torch SDPA": lambda: F.scaled_dot_product_attention(*heads(), attn_mask=biased(), scale=1.0),
        "ptm attention": lambda: attention(*heads(), biased(), 0.0, False, 1.0),
        "BiasedAttention": lambda: (
            BiasedAttention.apply(qkv, biased(), HEADS, 1.0).view(B, T, HEADS, HEAD_SIZE).transpose(1, 2)
        ),
    }
    results = time_backward(ways, grad, [qkv, relative], repeats=20, warmup=3)
    for name, (seconds, _) in results.items():
        print(f"{name:15} {seconds * 1e3:5.1f} ms")
    (_, theirs), *ours = results.values()
    for name, (_, grads) in zip(list(ways)[1:], ours):
        difference = max((a - b).abs().max().item() for a, b in zip(grads, theirs))
        print(f"largest gradient difference, {name} against SDPA: {difference:.1e}")


if __name__ == "__main__":
    main()
