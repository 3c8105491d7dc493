"""What a matrix product of a new shape costs under bf16 on a CPU: torch runs bf16 products through oneDNN, which
builds (JIT-compiles) a kernel for each new shape and keeps it, where fp32 ones go to MKL with nothing kept.
Run: python tests/bench/bf16_shapes.py [PRODUCTS]   (default 100; each case in a fresh process)
For fp32 and bf16: PRODUCTS products of one shape (~3,000 x 256 by 256 x 1024, a layer's rows by its weight),
then PRODUCTS of as many shapes (one more row each), then as many weight gradients (1,024 x rows by rows x 256,
one more row each): ms a product and the peak RSS each case added, per product."""

from __future__ import annotations

import json
import subprocess
import sys

CASE = """
import json, resource, sys, time, torch
dtype, case, count = getattr(torch, sys.argv[1]), sys.argv[2], int(sys.argv[3])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weight = torch.randn(1024, 256).to(dtype)
(torch.randn(3000, 256).to(dtype) @ weight.t()).sum()  # the library loaded and one kernel built
before, spent = rss(), 0.0
for i in range(count):
    rows = 3000 if case == "one shape" else 3001 + i
    x = torch.ones(rows, 256, dtype=dtype)
    other = torch.ones(rows, 1024, dtype=dtype).t() if case == "weight gradients" else weight.t()
    start = time.perf_counter()
    other @ x if case == "weight gradients" else x @ other
    spent += time.perf_counter() - start
print(json.dumps({"ms": spent / count * 1e3, "mb": (rss() - before) / count}))
"""
CASES = {  # the case CASE runs: what the table calls it
    "one shape": "one shape",
    "a new shape each": "a new shape each",
    "weight gradients": "weight gradients, a new shape each",
}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    print(f"{'dtype':10}{'case':36}{'ms a product':>14}{'RSS added a product':>22}")
    for dtype in ("float32", "bfloat16"):
        for case, label in CASES.items():
            out = subprocess.run(
                [sys.executable, "-c", CASE, dtype, case, str(count)], capture_output=True, text=True, check=True
            )
            result = json.loads(out.stdout.splitlines()[-1])
            print(f"{dtype:10}{label:36}{result['ms']:>14.2f}{result['mb']:>19.2f} MB", flush=True)


if __name__ == "__main__":
    main()
