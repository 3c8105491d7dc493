"""Attention under CPU bf16 autocast without dropout, forward + backward: torch's SDPA (its fused kernel) against
ptm's `models/attention.attention`, which writes it out when the inputs need gradients (scores and softmax in fp32
from q and k upcast, the weights cast down for their product with v; `RebuiltAttention`, and with the weights kept
by autograd as in `ProjectedInBackward`'s second pass), at two bench shapes: T5's cross-attention (32
examples x 4 heads, 26 decoder queries attending to 116 encoder keys, padding in half the examples, scale 1) and a
128-token causal self-attention (32 x 4 heads, head size 64). Prints the median of 20 interleaved repeats of each, each
one's gradients against fp64's (largest difference relative to the largest gradient), and the forward pass alone,
which is all evaluation runs: there, without gradients, `attention` hands over to the fused kernel.
Run: python tests/bench/attention_bf16.py"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from backward_timing import time_backward

from ptmcli.models.attention import attention

CASES = {  # name: (queries, keys, head size, causal, padded, scale)
    "T5 cross-attention": (26, 116, 64, False, True, 1.0),
    "causal self-attention": (128, 128, 64, True, False, None),
}
B, HEADS = 32, 4


def main() -> None:
    for name, (queries, keys, head_size, causal, padded, scale) in CASES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, HEADS, n, head_size).bfloat16().requires_grad_() for n in (queries, keys, keys))
        mask = None
        if padded:
            mask = torch.ones(B, 1, 1, keys, dtype=torch.bool)
            mask[B // 2 :, ..., keys - 8 :] = False
        grad = torch.randn(B, HEADS, queries, head_size).bfloat16()

        def fused(q=q, k=k, v=v):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)

        def ours():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return attention(q, k, v, mask, 0.0, causal, scale)

        def kept():  # as in ProjectedInBackward's second pass (T5's cross-attention in training)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return attention(q, k, v, mask, 0.0, causal, scale, backward_follows=True)

        ways = {"torch SDPA": fused, "ptm attention": ours, "weights kept": kept}
        results = time_backward(ways, grad, [q, k, v], repeats=20, warmup=3)
        exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
        fused(*exact).backward(grad.double())
        print(f"{name}:")
        for way, (seconds, grads) in results.items():
            off = max(((g.double() - e.grad).abs().max() / e.grad.abs().max()).item() for g, e in zip(grads, exact))
            print(f"  {way:14} {seconds * 1e3:5.1f} ms forward + backward, gradients off fp64's by {off:.1e}")
        forward = {"torch SDPA": [], "ptm attention": []}
        for _ in range(23):
            for way, fn in (("torch SDPA", fused), ("ptm attention", ours)):
                start = time.perf_counter()
                fn()  # recording gradients, which is what sends `attention` to its written-out path
                forward[way].append(time.perf_counter() - start)
        print(
            "  forward alone: "
            + ", ".join(f"{way} {statistics.median_low(t[3:]) * 1e3:.1f} ms" for way, t in forward.items())
        )


if __name__ == "__main__":
    main()
