"""T5's RMS norm forward + backward at its bench encoder's shape (3,712 tokens x 256), ptm's `rms_norm` against the
plain autograd sequence (pow, mean, rsqrt, multiply). Prints the median of 40 interleaved repeats of each and the
largest difference between their gradients.
Run: python tests/bench/rms_norm.py"""

from __future__ import annotations

import time

import torch

from ptmcli.models.recompute import rms_norm

ROWS, WIDTH, EPS = 3712, 256, 1e-6


def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(WIDTH)).requires_grad_()
    grad = torch.randn(ROWS, WIDTH)
    ways = {"plain autograd": plain, "ptm rms_norm": lambda x, w: rms_norm(x, w, EPS)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    grads = {}
    for _ in range(45):
        for name, way in ways.items():
            x.grad = weight.grad = None
            start = time.perf_counter()
            way(x, weight).backward(grad)
            times[name].append(time.perf_counter() - start)
            grads[name] = (x.grad, weight.grad)
    for name, seconds in times.items():
        print(f"{name:15} {sorted(seconds[5:])[20] * 1e3:5.2f} ms")
    (a, b), (c, d) = grads.values()
    differences = [(ours - plain).abs().max().item() for ours, plain in ((c, a), (d, b))]
    print("largest gradient difference: {:.1e} (x), {:.1e} (weight)".format(*differences))


if __name__ == "__main__":
    main()
