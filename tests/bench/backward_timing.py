"""Forward + backward of a few ways to compute one thing, timed interleaved, for the micro-benches beside this file
(`attention_bias.py`, `cross_attention.py`, `rms_norm.py`)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_backward(
    ways: dict[str, Callable[[], torch.Tensor]],
    grad: torch.Tensor,
    leaves: list[torch.Tensor],
    repeats: int,
    warmup: int,
) -> dict[str, tuple[float, list[torch.Tensor]]]:
    """Each way's output, backward from `grad`, `warmup + repeats` times, the ways taking turns; returns each way's
    median seconds over the repeats after the warm-up and the gradients of `leaves` its last call left."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    grads: dict[str, list[torch.Tensor]] = {}
    for _ in range(warmup + repeats):
        for name, way in ways.items():
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            way().backward(grad)
            times[name].append(time.perf_counter() - start)
            grads[name] = [leaf.grad for leaf in leaves]
    return {name: (statistics.median_low(times[name][warmup:]), grads[name]) for name in ways}
