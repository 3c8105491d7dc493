"""The output layer alone: cross-entropy of 4,064 targets over GPT-2's 50,257-token vocabulary from 256-wide
hidden states, forward + backward, the straightforward way (all logits at once) against ptm's chunked loss.
Run: python tests/bench/vocab_loss.py [--vocab V] [--spread S] [--rows R ... | --block-rows R ... | --exp]  (best
of 4 interleaved repeats, seconds per call); with --vocab, a vocabulary of V tokens instead (before --rows /
--block-rows); with --spread, the output weight's standard deviation (0.02: logits as at initialisation, all within a
few units of each other; 1.0 puts 12 % of them more than 87.3 below their row's largest, where an fp32 exponential
underflows); with --rows, ptm's loss at each of those rows per chunk instead (its default: `vocab_loss.chunk_rows`);
with --block-rows, at each of those rows per block of its softmax passes (its default: `CACHE_BLOCK_ELEMENTS` over the
vocabulary; a chunk's rows, 512 here, for the whole chunk at once); with --exp, ptm's loss with its exponentials
(`exponential.exp_`) against torch's exp_, then the two alone on 512 x 50,257 elements, each holding one argument."""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from ptmcli.models import exponential, vocab_loss
from ptmcli.models.vocab_loss import projected_cross_entropy


def with_setting(name: str, value):
    """ptm's loss with `vocab_loss.<name>` set to `value` for the call."""

    def loss(hidden, weight, targets):
        default = getattr(vocab_loss, name)
        setattr(vocab_loss, name, value)
        try:
            return projected_cross_entropy(hidden, weight, None, targets).loss
        finally:
            setattr(vocab_loss, name, default)

    return loss


def exponentials() -> None:
    """torch's exp_ and ptm's on 512 x 50,257 elements, each filled with one argument (the fill's time taken off)."""
    x = torch.empty(512 * 50257)
    ways = {"torch's exp_": torch.Tensor.exp_, "exponential.exp_": exponential.exp_}
    for argument in (-5.0, -86.0, -88.0, -95.0, -110.0, -200.0, float("-inf")):
        best = dict.fromkeys(["fill", *ways], float("inf"))
        for _ in range(4):
            for name, op in [("fill", lambda t: t), *ways.items()]:
                start = time.perf_counter()
                op(x.fill_(argument))
                best[name] = min(best[name], time.perf_counter() - start)
        times = ", ".join(f"{name} {(best[name] - best['fill']) * 1e3:.1f} ms" for name in ways)
        print(f"exp({argument:g}): {times}")


def main() -> None:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as ptm's loop does on a CPU
    rows, width = 32 * 127, 256
    vocab = int(sys.argv[sys.argv.index("--vocab") + 1]) if "--vocab" in sys.argv else 50257
    spread = float(sys.argv[sys.argv.index("--spread") + 1]) if "--spread" in sys.argv else 0.02
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * spread).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    if "--rows" in sys.argv:
        ways = {
            f"ptm, {r} rows a chunk": with_setting("chunk_rows", lambda *_, r=int(r): r)
            for r in sys.argv[sys.argv.index("--rows") + 1 :]
        }
    elif "--block-rows" in sys.argv:
        ways = {
            f"ptm, {r} rows a block": with_setting("CACHE_BLOCK_ELEMENTS", int(r) * vocab)
            for r in sys.argv[sys.argv.index("--block-rows") + 1 :]
        }
    elif "--exp" in sys.argv:
        ways = {
            "ptm, torch's exp_": with_setting("exp_", torch.Tensor.exp_),
            "ptm, exponential.exp_": with_setting("exp_", exponential.exp_),
        }
    else:
        ways = {
            "all logits at once": lambda h, w, t: F.cross_entropy(F.linear(h, w), t, reduction="sum"),
            f"ptm, chunked ({vocab_loss.chunk_rows(vocab)} rows)": lambda h, w, t: (
                projected_cross_entropy(h, w, None, t).loss
            ),
        }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(4):
        for name, loss in ways.items():
            start = time.perf_counter()
            loss(hidden, weight, targets).backward()
            best[name] = min(best[name], time.perf_counter() - start)
    floor = 3 * 2 * rows * width * vocab
    for name, seconds in best.items():
        print(f"{name:26} {seconds:.2f} s  ({floor / seconds / 1e9:.0f} GFLOP/s in the three matrix products)")
    if "--exp" in sys.argv:
        exponentials()


if __name__ == "__main__":
    main()
