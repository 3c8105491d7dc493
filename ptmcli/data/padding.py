"""Rows of different lengths as one right-padded batch tensor (pretraining examples and fine-tuning tasks alike)."""

from __future__ import annotations

import numpy as np
import torch


def pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out
