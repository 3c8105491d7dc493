"""Device, precision and autocast: what `hardware.*` resolves to on this machine."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
from ptmcli.malloc import keep_freed_memory
from ptmcli.schema import HardwareConfig


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast

    @property
    def uses_scaler(self) -> bool:
        """fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not."""
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # hardware.precision -> dtype


def resolve(cfg: HardwareConfig, dist: Dist) -> Hardware:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PtmError("hardware.device=cuda but no CUDA device is visible. Use hardware=cpu or hardware=auto.")
    device = torch.device(kind, dist.local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    else:
        # CPU arithmetic on subnormal floats is 10-100x slower, and training makes many: Adam's second moments of
        # tiny gradients, rows of embeddings a batch never uses. Flushed to zero they change nothing measurable;
        # left alone they made AdamW a third of a T5-mini step on this CPU.
        torch.set_flush_denormal(True)
        keep_freed_memory()
    precision = cfg.precision
    if precision == "auto":
        # bf16 autocast is slower than fp32 on CPUs without bf16 matrix units, and changes a run's numbers, so fp32
        # is the CPU default; where the CPU has them (AMX), hardware.precision=bf16 trains faster (docs/configs.md)
        precision = "fp32" if kind == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp16" and kind == "cpu":
        raise PtmError("hardware.precision=fp16 needs a GPU; on CPU use fp32 (or bf16).")
    return Hardware(device=device, dtype=DTYPES[precision])


# Dense peak FLOP/s of known accelerators by (name fragment, dtype), from the vendors' data sheets (no sparsity;
# fp32 is the plain fp32 rate, not TF32). The first fragment found in torch.cuda.get_device_name() counts.
GPU_PEAKS = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 30.3e12},
    "A10": {torch.bfloat16: 125e12, torch.float16: 125e12, torch.float32: 31.2e12},
    "V100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "T4": {torch.float16: 65e12, torch.float32: 8.1e12},
    "RTX 4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 82.6e12},
    "RTX 3090": {torch.bfloat16: 71e12, torch.float16: 71e12, torch.float32: 35.6e12},
}


def cpu_matmul_rate(seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of 2048-wide matrix products in `dtype` on this CPU with torch's threads, measured now for `seconds`.
    bf16 differs most where the CPU multiplies bf16 matrices in hardware (AMX): ~2,000 against ~320 GFLOP/s on
    the 2 cores `docs/results.md` was measured on."""
    # a generator of its own: drawing from torch's would shift every later dropout mask, so a run on a cold cache
    # would differ from the same run on a warm one
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2048, 2048, generator=generator).to(dtype) for _ in range(2))
    a @ b
    start, products = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        products += 1
    return 2 * 2048**3 * products / (time.perf_counter() - start)


def peak_flops(hw: Hardware) -> float | None:
    """The device's peak FLOP/s at the run's dtype: a table for known GPUs; on a CPU, the rate of matrix products in
    the run's dtype (autocast's), measured once (1 s, all threads, 2048-wide products: smaller ones stay below the
    rate) and cached under PTM_CACHE. None when unknown."""
    if hw.device.type == "cuda":
        name = torch.cuda.get_device_name(hw.device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name:
                return peaks.get(hw.dtype)
        return None
    if hw.device.type != "cpu":
        return None
    import json
    import os
    from pathlib import Path

    threads = torch.get_num_threads()
    suffix = "" if hw.dtype == torch.float32 else "-" + str(hw.dtype).removeprefix("torch.")  # fp32 as it was named
    cache = (
        Path(os.environ.get("PTM_CACHE", Path.home() / ".cache" / "ptm")) / f"cpu-peak-{threads}-threads{suffix}.json"
    )
    try:
        return float(json.loads(cache.read_text())["flops"])
    except (OSError, ValueError, KeyError):
        pass
    flops = cpu_matmul_rate(dtype=hw.dtype)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        measured = {"flops": flops, "threads": threads, "dtype": str(hw.dtype), "measured": time.strftime("%Y-%m-%d")}
        cache.write_text(json.dumps(measured))
    except OSError:
        pass
    return flops
