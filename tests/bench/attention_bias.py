"""Attention with an additive bias that needs a gradient (T5's position bias) on a CPU, forward + backward at T5's
bench shapes (32 sequences x 4 heads x 116 positions x 64): torch's SDPA, which runs its reference computation for
such a mask, against ptm's `models/attention.attention`, which writes the same computation out, and against
`BiasedAttention` (what T5's self-attention runs without dropout: from the fused projection, the weights rebuilt in
the backward pass; its output is merged back to (B, T, C), viewed here as heads again). Prints the median of 20
interleaved repeats of each and the largest difference between each one's gradients and SDPA's.
With --bf16, as T5's self-attention runs under CPU bf16 autocast: a bf16 projection, SDPA with the bias cast to bf16
(its reference computation, which upcasts q, k, v and the scores, what T5 ran before stop 57), against
`BiasedAttention` on the bf16 projection (what it runs now: scores in fp32, three of its five products in bf16) and
on the projection upcast once (fp32 inside), each one's gradients against fp64's.
Run: python tests/bench/attention_bias.py [--bf16]"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from backward_timing import time_backward

from ptmcli.models.attention import attention
from ptmcli.models.recompute import BiasedAttention

B, HEADS, T, HEAD_SIZE = 32, 4, 116, 64


def main() -> None:
    if "--bf16" in sys.argv:
        return in_bf16()
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


def in_bf16() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * HEADS * HEAD_SIZE).bfloat16().requires_grad_()
    relative = torch.randn(1, HEADS, T, T, requires_grad=True)
    allowed = torch.ones(B, 1, 1, T, dtype=torch.bool)
    allowed[B // 2 :, :, :, T - 8 :] = False
    grad = torch.randn(B, T, HEADS * HEAD_SIZE).bfloat16()

    def heads(x):
        return [t.view(B, T, HEADS, HEAD_SIZE).transpose(1, 2) for t in x.split(HEADS * HEAD_SIZE, 2)]

    def merged(y):
        return y.transpose(1, 2).reshape(B, T, HEADS * HEAD_SIZE)

    def sdpa():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bias = relative.masked_fill(~allowed, float("-inf")).to(torch.bfloat16)
            return merged(F.scaled_dot_product_attention(*heads(qkv), attn_mask=bias, scale=1.0))

    def upcast():
        biased = relative.masked_fill(~allowed, float("-inf"))
        return BiasedAttention.apply(qkv.float(), biased, HEADS, 1.0).to(torch.bfloat16)

    qkv_64, relative_64 = (t.detach().double().requires_grad_() for t in (qkv, relative))

    def exact():
        bias = relative_64.masked_fill(~allowed, float("-inf"))
        q, k, v = heads(qkv_64)
        return merged(torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v)

    def as_is():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return BiasedAttention.apply(qkv, relative.masked_fill(~allowed, float("-inf")), HEADS, 1.0)

    ways = {"torch SDPA (bf16)": sdpa, "BiasedAttention (bf16)": as_is, "BiasedAttention (fp32)": upcast}
    results = time_backward(ways, grad, [qkv, relative], repeats=20, warmup=3)
    exact().backward(grad.double())
    reference = [qkv_64.grad, relative_64.grad]
    for name, (seconds, grads) in results.items():
        off = [(g.double() - r).abs().max().item() for g, r in zip(grads, reference)]
        print(f"{name:23} {seconds * 1e3:5.1f} ms   off fp64's gradients: q, k, v {off[0]:.1e}, bias {off[1]:.1e}")


if __name__ == "__main__":
    main()
