"""Dropout alone: a BERT-mini activation (32 x 128 x 256) and its attention weights (32 x 4 x 128 x 128) at p = 0.1,
forward + backward, torch's dropout against ptm's (models/dropout.py), and attention with dropout through SDPA
against ptm's written-out attention (models/attention.attention).
Run: python tests/bench/dropout.py  (best of 8 interleaved repeats, milliseconds per call)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ptmcli.models.attention import attention
from ptmcli.models.dropout import dropout


def main() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(32, 128, 256, requires_grad=True)
    weights = torch.randn(32, 4, 128, 128).softmax(-1).requires_grad_()
    q, k, v = (torch.randn(32, 4, 128, 64, requires_grad=True) for _ in range(3))
    ways = {
        "activation: torch": lambda: F.dropout(hidden, 0.1),
        "activation: ptm": lambda: dropout(hidden, 0.1),
        "attention weights: torch": lambda: F.dropout(weights, 0.1),
        "attention weights: ptm": lambda: dropout(weights, 0.1),
        "attention, dropout 0.1: SDPA": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
        "attention, dropout 0.1: ptm": lambda: attention(q, k, v, None, 0.1, False, None),
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(8):
        for name, run in ways.items():
            start = time.perf_counter()
            run().sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:30} {seconds * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
