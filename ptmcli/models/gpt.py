"""GPT-2 (Radford et al., 2019): a pre-LayerNorm causal decoder with learned positions.

`Gpt` maps token ids to final hidden states and is what task heads sit on (they read the last real token:
only it has seen the whole text). `GptForCausalLM` adds the output projection tied to the word embeddings
and decodes incrementally with a KV cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.architectures import GptArch
from ptmcli.models.dropout import Dropout
from ptmcli.models.layers import DecoderBlock, init_normal, layer_stack
from ptmcli.models.rows import PackedRows
from ptmcli.models.vocab_loss import VocabLoss, projected_cross_entropy


class Embeddings(nn.Module):
    def __init__(self, arch: GptArch, vocab_size: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, arch.hidden_size)
        self.position = nn.Embedding(arch.max_positions, arch.hidden_size)
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """input_ids: (B, T) at positions start..start+T-1 -> (B, T, C)"""
        T = input_ids.shape[1]
        return self.dropout(self.word(input_ids) + self.position.weight[start : start + T])


class Gpt(nn.Module):
    """The decoder stack: (B, T) ids -> (B, T, C) hidden states after the final LayerNorm.

    Attention is causal, so right padding never reaches a real token: `attention_mask` only lets a right-padded
    batch run its layers on its real tokens (`PackedRows`), and heads use it to find each row's last real token."""

    summary = "last"  # the token whose state summarises a text for sequence heads

    def __init__(self, arch: GptArch, vocab_size: int):
        super().__init__()
        self.arch = arch
        self.vocab_size = vocab_size
        self.embeddings = Embeddings(arch, vocab_size)
        self.layers = layer_stack(arch, DecoderBlock, arch.activation)
        self.final_norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[dict] | None = None,
    ) -> torch.Tensor:
        """`cache`: one dict per layer of earlier keys/values (decoding); the new ids continue after them."""
        start = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        if start + input_ids.shape[1] > self.arch.max_positions:
            raise ValueError(
                f"sequence of {start + input_ids.shape[1]} tokens exceeds the model's {self.arch.max_positions} "
                f"positions"
            )
        x = self.embeddings(input_ids, start)
        rows = PackedRows.of(attention_mask) if cache is None and _right_padded(attention_mask) else None
        x = x if rows is None else rows.pack(x)  # a padded batch runs on its real tokens
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache is not None else None, rows=rows)
        x = self.final_norm(x)
        return x if rows is None else rows.unpack(x)


def _right_padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether every row's padding comes after its tokens: then leaving it out changes nothing a real token sees."""
    return attention_mask is not None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def init_gpt(module: nn.Module, arch: GptArch) -> None:
    """GPT-2 initialisation: N(0, 0.02), with the projections that write into the residual stream scaled by
    1/sqrt(2 * layers) so the stream's variance does not grow with depth."""
    init_normal(module, arch.init_std)
    for name, p in module.named_parameters():
        if name.endswith(("attention.out.weight", "ffn.down.weight")):
            nn.init.normal_(p, mean=0.0, std=arch.init_std / math.sqrt(2 * arch.num_layers))


class GptForCausalLM(nn.Module):
    def __init__(self, arch: GptArch, vocab_size: int):
        super().__init__()
        self.encoder = Gpt(arch, vocab_size)
        init_gpt(self, arch)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[dict] | None = None,
        targets: torch.Tensor | None = None,
        predict: bool = False,
    ) -> torch.Tensor | VocabLoss:
        """(B, T) -> next-token logits (B, T, V); the output projection is the word embedding matrix.

        With `targets` (B, T) (IGNORE where none): their summed cross-entropy instead, the logits never held
        whole (`predict`: with each position's argmax)."""
        hidden = self.encoder(input_ids, cache=cache)
        if targets is not None:
            return projected_cross_entropy(hidden, self.encoder.embeddings.word.weight, None, targets, predict)
        return F.linear(hidden, self.encoder.embeddings.word.weight)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.encoder.layers]

    @property
    def max_positions(self) -> int:
        return self.encoder.arch.max_positions


def build_pretraining(arch: GptArch, vocab_size: int, objective) -> GptForCausalLM:
    return GptForCausalLM(arch, vocab_size)


def build_encoder(arch: GptArch, vocab_size: int) -> Gpt:
    encoder = Gpt(arch, vocab_size)
    init_gpt(encoder, arch)
    return encoder
