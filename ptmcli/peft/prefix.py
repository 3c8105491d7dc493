"""Prefix tuning (Li & Liang 2021): P learned key/value states prepended in every attention layer.

During training the prefixes come from a reparametrisation, an embedding of P tokens through an MLP
(tanh), which trains more stably than the raw states; `freeze()` replaces it by the plain tensors it
produces, which is all inference and export need.
"""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.models.dropout import Dropout


class PrefixEncoder(nn.Module):
    def __init__(
        self, num_layers: int, num_heads: int, hidden_size: int, num_tokens: int, projection_hidden: int, dropout: float
    ):
        super().__init__()
        self.shape = (num_tokens, num_layers, 2, num_heads, hidden_size // num_heads)
        self.embedding = nn.Embedding(num_tokens, hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, projection_hidden),
            nn.Tanh(),
            nn.Linear(projection_hidden, num_layers * 2 * hidden_size),
        )
        self.dropout = Dropout(dropout)
        self.register_buffer("frozen_states", None)

    def states(self) -> torch.Tensor:
        """(P, L * 2 * C): the prefix keys and values of every layer."""
        if self.frozen_states is not None:
            return self.frozen_states
        return self.mlp(self.embedding.weight)

    @torch.no_grad()
    def freeze(self) -> None:
        self.frozen_states = self.states().detach().clone()
        del self.embedding, self.mlp

    def layer(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer `index`: (B, nh, P, hs) each."""
        P, _, _, nh, hs = self.shape
        kv = self.dropout(self.states()).view(self.shape)[:, index]  # (P, 2, nh, hs)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2, B, nh, P, hs)
        return kv[0], kv[1]


class LayerPrefix:
    """The callable an attention layer asks for its prefix; not a module, so parameters register once."""

    def __init__(self, encoder: PrefixEncoder, index: int):
        self.encoder, self.index = encoder, index

    @property
    def length(self) -> int:
        """P, the number of prefix positions."""
        return self.encoder.shape[0]

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.layer(self.index, batch_size)
