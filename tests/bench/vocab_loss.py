"""The output layer alone: cross-entropy of 4,064 targets over GPT-2's 50,257-token vocabulary from 256-wide
hidden states, forward + backward, the straightforward way (all logits at once) against ptm's chunked loss.
Run: python tests/bench/vocab_loss.py  (best of 4 interleaved repeats, seconds per call)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ptmcli.models.vocab_loss import projected_cross_entropy


def main() -> None:
    torch.manual_seed(0)
    rows, width, vocab = 32 * 127, 256, 50257
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    ways = {
        "all logits at once": lambda: F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum"),
        "ptm, chunked": lambda: projected_cross_entropy(hidden, weight, None, targets).loss,
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(4):
        for name, loss in ways.items():
            start = time.perf_counter()
            loss().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    floor = 3 * 2 * rows * width * vocab
    for name, seconds in best.items():
        print(f"{name:20} {seconds:.2f} s  ({floor / seconds / 1e9:.0f} GFLOP/s in the three matrix products)")


if __name__ == "__main__":
    main()
