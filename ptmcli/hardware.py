"""Device, precision and autocast: what `hardware.*` resolves to on this machine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
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


def resolve(cfg: HardwareConfig, dist: Dist) -> Hardware:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PtmError("hardware.device=cuda but no CUDA device is visible. Use hardware=cpu or hardware=auto.")
    device = torch.device(kind, dist.local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    precision = cfg.precision
    if precision == "auto":
        # bf16 autocast is slower than fp32 on common CPUs, so fp32 is the CPU default.
        precision = "fp32" if kind == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp16" and kind == "cpu":
        raise PtmError("hardware.precision=fp16 needs a GPU; on CPU use fp32 (or bf16).")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Hardware(device=device, dtype=dtype)
