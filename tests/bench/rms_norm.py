"""T5's RMS norm forward + backward at its bench encoder's shape (3,712 tokens x 256), ptm's `rms_norm` against the
plain autograd sequence (pow, mean, rsqrt, multiply). Prints the median of 40 interleaved repeats of each and the
largest difference between their gradients.
Run: python tests/bench/rms_norm.py"""

from __future__ import annotations

import torch
from backward_timing import time_backward

from ptmcli.models.recompute import rms_norm

ROWS, WIDTH, EPS = 3712, 256, 1e-6


def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(WIDTH)).requires_grad_()
    grad = torch.randn(ROWS, WIDTH)
    ways = {"plain autograd": lambda: plain(x, weight), "ptm rms_norm": lambda: rms_norm(x, weight, EPS)}
    results = time_backward(ways, grad, [x, weight], repeats=40, warmup=5)
    for name, (seconds, _) in results.items():
        print(f"{name:15} {seconds * 1e3:5.2f} ms")
    (_, theirs), (_, ours) = results.values()
    differences = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    print("largest gradient difference: {:.1e} (x), {:.1e} (weight)".format(*differences))


if __name__ == "__main__":
    main()
