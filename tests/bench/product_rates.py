"""How fast T5-mini's encoder-layer products run when their operands come from memory, as in a training step, against
the same products on operands still in the caches, as a loop timing one product alone has them (docs/results.md,
stop 58). The shapes are those of `make bench`'s T5 step (32 x 116 tokens, width 256, feed-forward 1024, the fused
query-key-value projection), each in the layout the step runs it in: x @ W^T forward, grad @ W for the input's
gradient, grad^T @ x for the weight's.

Run: python tests/bench/product_rates.py [--pool-mb 768]
Prints each product's GFLOP/s warm (the same operands again) and cold (the next of a pool of operand sets larger
than the CPU's caches), then one encoder layer's products (forward and backward) in ms both ways, beside this CPU's
2048-wide fp32 rate measured now."""

from __future__ import annotations

import argparse
import time

import torch

from ptmcli.hardware import cpu_matmul_rate

TOKENS, WIDTH, FEED_FORWARD = 32 * 116, 256, 1024

# (name, rows, inner, columns, layout): layout "xWt" = x (rows, inner) @ W^T, W (columns, inner); "gW" = grad (rows,
# inner) @ W (inner, columns); "gtx" = grad^T @ x, grad (inner, rows), x (inner, columns): a weight's gradient
PRODUCTS = [
    ("query-key-value, forward", TOKENS, WIDTH, 3 * WIDTH, "xWt"),
    ("query-key-value, input gradient", TOKENS, 3 * WIDTH, WIDTH, "gW"),
    ("query-key-value, weight gradient", 3 * WIDTH, TOKENS, WIDTH, "gtx"),
    ("output, forward", TOKENS, WIDTH, WIDTH, "xWt"),
    ("output, input gradient", TOKENS, WIDTH, WIDTH, "gW"),
    ("output, weight gradient", WIDTH, TOKENS, WIDTH, "gtx"),
    ("feed-forward up, forward", TOKENS, WIDTH, FEED_FORWARD, "xWt"),
    ("feed-forward up, input gradient", TOKENS, FEED_FORWARD, WIDTH, "gW"),
    ("feed-forward up, weight gradient", FEED_FORWARD, TOKENS, WIDTH, "gtx"),
    ("feed-forward down, forward", TOKENS, FEED_FORWARD, WIDTH, "xWt"),
    ("feed-forward down, input gradient", TOKENS, WIDTH, FEED_FORWARD, "gW"),
    ("feed-forward down, weight gradient", WIDTH, TOKENS, FEED_FORWARD, "gtx"),
]


def operands(rows: int, inner: int, columns: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands as views in the step's layout."""
    if layout == "xWt":
        return torch.randn(rows, inner), torch.randn(columns, inner).t()
    if layout == "gW":
        return torch.randn(rows, inner), torch.randn(inner, columns)
    return torch.randn(inner, rows).t(), torch.randn(inner, columns)


def seconds_per_product(pairs: list, rounds: int) -> float:
    """Mean seconds of one product over `rounds` passes through `pairs` (after one unmeasured pass)."""
    for a, b in pairs:
        a @ b
    start = time.perf_counter()
    for _ in range(rounds):
        for a, b in pairs:
            a @ b
    return (time.perf_counter() - start) / (rounds * len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-mb", type=int, default=768, help="operand memory cycled through for the cold rate")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"this CPU's 2048-wide fp32 product rate now: {cpu_matmul_rate(seconds=2.0) / 1e9:,.0f} GFLOP/s")
    layer = {"warm": 0.0, "cold": 0.0}
    for name, rows, inner, columns, layout in PRODUCTS:
        flops = 2 * rows * inner * columns
        size = 4 * (rows * inner + inner * columns)
        warm = seconds_per_product([operands(rows, inner, columns, layout)], rounds=20)
        pool = [operands(rows, inner, columns, layout) for _ in range(max(2, args.pool_mb * 2**20 // size))]
        cold = seconds_per_product(pool, rounds=max(1, 40 // len(pool)))
        del pool
        layer["warm"] += warm
        layer["cold"] += cold
        print(f"{name:36} {rows:5} x {inner:5} x {columns:5}  warm {flops / warm / 1e9:4,.0f}  "
              f"cold {flops / cold / 1e9:4,.0f} GFLOP/s")  # fmt: skip
    print(f"one encoder layer's products: {1e3 * layer['warm']:.1f} ms warm, {1e3 * layer['cold']:.1f} ms cold "
          f"({layer['cold'] / layer['warm'] - 1:+.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
