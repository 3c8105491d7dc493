"""Task heads on any encoder that maps (input_ids, token_type_ids, attention_mask) -> (B, T, C) hidden states."""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.models.layers import last_token


class TaskModel(nn.Module):
    """encoder + a head: `sequence` (pooled -> labels), `token` (every position -> labels) or `span` (start/end).

    With `frozen=True` the encoder runs in eval mode under no_grad: feature extraction, head-only training.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: str,
        num_outputs: int,
        dropout: float,
        frozen: bool = False,
        pooling: str = "pooler",
    ):
        super().__init__()
        self.encoder, self.head_kind, self.frozen, self.pooling = encoder, head, frozen, pooling
        hidden = encoder.arch.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 2 if head == "span" else num_outputs)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "TaskModel":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen feature extractor keeps dropout off
        return self

    def features(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """(B, C) pooled features for sequence heads, (B, T, C) hidden states otherwise."""
        with torch.no_grad() if self.frozen else torch.enable_grad():
            hidden = self.encoder(input_ids, token_type_ids, attention_mask)
            if self.head_kind != "sequence":
                return hidden
            pooling = self.pooling
            if pooling == "pooler":  # the family's own summary: BERT's pooler, else its summary token or the mean
                if getattr(self.encoder, "pooler", None) is not None:
                    return self.encoder.pool(hidden)
                pooling = {"last": "last", "mean": "mean"}.get(getattr(self.encoder, "summary", "first"), "cls")
            if pooling == "mean":
                weights = (
                    attention_mask.unsqueeze(-1).to(hidden.dtype)
                    if attention_mask is not None
                    else torch.ones_like(hidden[..., :1])
                )
                return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            return last_token(hidden, attention_mask) if pooling == "last" else hidden[:, 0]

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """sequence: (B, labels); token: (B, T, labels); span: (B, T, 2) start/end logits."""
        return self.head(self.dropout(self.features(input_ids, token_type_ids, attention_mask)))


HEADS = {"text-cls": "sequence", "pair-cls": "sequence", "token-cls": "token", "qa": "span"}
