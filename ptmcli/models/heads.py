"""Task heads on any encoder that maps (input_ids, token_type_ids, attention_mask) -> (B, T, C) hidden states."""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.models.layers import last_token, pool


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
            if pooling == "last":
                return last_token(hidden, attention_mask)
            return pool(hidden, attention_mask, "mean" if pooling == "mean" else "cls")

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """sequence: (B, labels); token: (B, T, labels); span: (B, T, 2) start/end logits."""
        return self.head(self.dropout(self.features(input_ids, token_type_ids, attention_mask)))


class SentenceEncoder(nn.Module):
    """An encoder trained for sentence vectors (SimCSE): its pooled states, through a dense + tanh projection that
    only training uses (the paper's unsupervised setting). `encoder` is what ptm embed, fine-tuning and export
    take; its keys stay `encoder.*` as in every pretraining model."""

    def __init__(self, encoder: nn.Module, pooling: str, projection: bool):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        hidden = encoder.arch.hidden_size
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if projection else None
        if self.projection is not None:
            nn.init.normal_(self.projection[0].weight, std=0.02)
            nn.init.zeros_(self.projection[0].bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """(B, T) -> (B, C) sentence vectors, not normalised."""
        pooled = pool(self.encoder(input_ids, token_type_ids, attention_mask), attention_mask, self.pooling)
        return self.projection(pooled) if self.projection is not None else pooled


HEADS = {"text-cls": "sequence", "pair-cls": "sequence", "token-cls": "token", "qa": "span"}
