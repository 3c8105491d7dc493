"""Houlsby adapters (Houlsby et al. 2019): a bottleneck MLP with a residual connection after the attention
output projection and after the feed-forward output, before each sub-layer's own residual and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapted(nn.Module):
    """y = base(x); y + up(gelu(down(y))). `up` starts at zero, so a fresh adapter changes nothing."""

    def __init__(self, base: nn.Linear, bottleneck: int):
        super().__init__()
        self.base = base
        self.adapter_down = nn.Linear(base.out_features, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, base.out_features)
        nn.init.normal_(self.adapter_down.weight, std=1e-3)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter_up(F.gelu(self.adapter_down(y)))
