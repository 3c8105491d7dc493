"""BART (Lewis et al., 2020): a post-LayerNorm encoder-decoder with learned positions, pretrained to rebuild
text from a corrupted copy (span infilling + sentence permutation; the noise lives in `data/`).

`Bart` is the encoder (what classification heads sit on); `BartForConditionalGeneration` adds the decoder,
which embeds with the encoder's word matrix and projects back onto it (plus a bias), so the matrix is
stored once, under `encoder`.
"""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.architectures import BartArch
from ptmcli.models.attention import CrossAttention, SelfAttention, padding_mask
from ptmcli.models.dropout import Dropout
from ptmcli.models.layers import EncoderDecoderLM, FeedForward, init_normal, layer_stack, residual, run_encoder_layers
from ptmcli.models.rows import PackedRows


class Embeddings(nn.Module):
    def __init__(self, arch: BartArch, vocab_size: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, arch.hidden_size)
        self.offset = arch.position_offset
        self.position = nn.Embedding(arch.position_offset + arch.max_positions, arch.hidden_size)
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(input_ids) + self.position.weight[self.offset : self.offset + input_ids.shape[1]]
        return self.dropout(self.norm(x))


class Bart(nn.Module):
    """The encoder: (B, T) ids -> (B, T, C)."""

    summary = "first"

    def __init__(self, arch: BartArch, vocab_size: int):
        super().__init__()
        self.arch, self.vocab_size = arch, vocab_size
        self.embeddings = Embeddings(arch, vocab_size)
        self.layers = layer_stack(arch)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        return run_encoder_layers(self.layers, x, attention_mask)


class DecoderLayer(nn.Module):
    """Post-LN: x = LN(x + self_attn(x)); x = LN(x + cross(x, memory)); x = LN(x + ffn(x))."""

    def __init__(self, arch: BartArch):
        super().__init__()
        h, eps = arch.hidden_size, arch.layer_norm_eps
        self.attention = SelfAttention(h, arch.num_heads, arch.attention_dropout)
        self.attention_norm = nn.LayerNorm(h, eps=eps)
        self.cross = CrossAttention(h, arch.num_heads, arch.attention_dropout)
        self.cross_norm = nn.LayerNorm(h, eps=eps)
        self.ffn = FeedForward(h, arch.intermediate_size)
        self.ffn_norm = nn.LayerNorm(h, eps=eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, x, memory, memory_mask, cache=None, rows=None):
        x = self.attention_norm(residual(x, self.dropout(self.attention(x, None, causal=True, cache=cache, rows=rows))))
        x = self.cross_norm(residual(x, self.dropout(self.cross(x, memory, memory_mask, cache, rows=rows))))
        return self.ffn_norm(residual(x, self.dropout(self.ffn(x))))


class Decoder(nn.Module):
    def __init__(self, arch: BartArch):
        super().__init__()
        self.offset = arch.position_offset
        self.position = nn.Embedding(arch.position_offset + arch.max_positions, arch.hidden_size)
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_decoder_layers))

    def forward(self, words, memory, memory_mask, cache=None, keep=None) -> torch.Tensor:
        """words: (B, T, C) word embeddings of the decoder inputs; `keep`: (B, T) the positions whose states are
        needed (the others, trailing, mean nothing)."""
        start = self.offset + (cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0)
        x = self.dropout(self.norm(words + self.position.weight[start : start + words.shape[1]]))
        rows = PackedRows.of(keep)
        x = x if rows is None else rows.pack(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, memory_mask, cache[i] if cache is not None else None, rows=rows)
        return x if rows is None else rows.unpack(x)


class BartForConditionalGeneration(EncoderDecoderLM):
    def __init__(self, arch: BartArch, vocab_size: int):
        super().__init__()
        self.encoder = Bart(arch, vocab_size)
        self.decoder = Decoder(arch)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.max_length = arch.max_positions
        init_normal(self, arch.init_std)

    def encode(self, input_ids, attention_mask) -> torch.Tensor:
        return self.encoder(input_ids, None, attention_mask)

    def decoder_states(self, decoder_ids, memory, attention_mask, cache=None, keep=None) -> torch.Tensor:
        """(B, T) decoder ids -> (B, T, C), what the output projection reads (see `EncoderDecoderLM`)."""
        words = self.encoder.embeddings.word(decoder_ids)
        return self.decoder(words, memory, padding_mask(attention_mask), cache, keep)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.encoder.embeddings.word.weight

    @property
    def output_bias(self) -> torch.Tensor:
        return self.lm_bias


def build_pretraining(arch: BartArch, vocab_size: int, objective) -> BartForConditionalGeneration:
    return BartForConditionalGeneration(arch, vocab_size)


def build_encoder(arch: BartArch, vocab_size: int) -> Bart:
    encoder = Bart(arch, vocab_size)
    init_normal(encoder, arch.init_std)
    return encoder


def build_seq2seq(arch: BartArch, vocab_size: int) -> BartForConditionalGeneration:
    return BartForConditionalGeneration(arch, vocab_size)
