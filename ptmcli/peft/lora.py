"""LoRA and AdaLoRA updates on linear layers, including slices of a fused projection (q/k/v of `qkv`).

An update on slice p of a linear layer is added to that slice of its output: W_p x + scale * B_p A_p x.
LoRA: A ~ Kaiming, B = 0 (no effect at start), scale = alpha / r.
AdaLoRA: the update is in SVD form P diag(E) Q (PEFT's names: B, E, A), E = 0 at start, and the entries of E
are switched off by importance to meet a shrinking rank budget; scale = alpha / r.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.dropout import Dropout


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP-sharded one (gathered, and differentiable), else the tensor itself: AdaLoRA's
    regulariser and rank allocation look at whole matrices outside the forward."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class LowRankLinear(nn.Module):
    """`base` plus low-rank updates on some of its `num_slices` equal output slices."""

    def __init__(
        self,
        base: nn.Linear,
        slices: list[int],
        num_slices: int,
        r: int,
        alpha: float,
        dropout: float,
        svd: bool = False,
    ):
        super().__init__()
        self.base, self.r, self.svd, self.merged = base, r, svd, False
        width = base.out_features // num_slices
        self.slices = [(i * width, (i + 1) * width) for i in slices]
        self.slice_ids = list(slices)
        self.scale = alpha / r
        self.dropout = Dropout(dropout)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, base.in_features)) for _ in slices)  # (r, in)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(width, r)) for _ in slices)  # (out, r)
        for a, b in zip(self.lora_A, self.lora_B):
            if svd:
                nn.init.normal_(a, std=0.02)
                nn.init.normal_(b, std=0.02)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if svd:
            self.lora_E = nn.ParameterList(nn.Parameter(torch.zeros(r, 1)) for _ in slices)  # singular values

    def _factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lora_A[k] * self.lora_E[k] if self.svd else self.lora_A[k]
        return a, self.lora_B[k]

    def delta(self) -> torch.Tensor:
        """The full (out, in) weight update."""
        out = torch.zeros_like(self.base.weight)
        for k, (lo, hi) in enumerate(self.slices):
            a, b = self._factors(k)
            out[lo:hi] = (b @ a) * self.scale
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x)
        pieces, at = [], 0
        for k, (lo, hi) in enumerate(self.slices):
            if lo > at:
                pieces.append(y.new_zeros(*y.shape[:-1], lo - at))
            a, b = self._factors(k)
            pieces.append(F.linear(F.linear(h, a), b) * self.scale)
            at = hi
        if at < y.shape[-1]:
            pieces.append(y.new_zeros(*y.shape[:-1], y.shape[-1] - at))
        return y + torch.cat(pieces, -1)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False

    def orthogonality(self) -> torch.Tensor:
        """AdaLoRA's regulariser: ||A A^T - I||^2 + ||B^T B - I||^2 over the slices."""
        eye = torch.eye(self.r, device=self.base.weight.device)
        pairs = [(whole(a), whole(b)) for a, b in zip(self.lora_A, self.lora_B)]
        return sum(((a @ a.T - eye) ** 2).sum() + ((b.T @ b - eye) ** 2).sum() for a, b in pairs)
