"""T5 (Raffel et al., 2020): a pre-norm encoder-decoder with RMS layer norms and no biases anywhere, and
bucketed relative position biases instead of position embeddings (bidirectional buckets in the encoder,
causal ones in the decoder), computed once per stack and shared by its layers.

`T5` is the encoder (what classification heads sit on); `T5ForConditionalGeneration` adds the decoder,
which reads the encoder's embedding matrix for its inputs and its (tied) output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.architectures import T5Arch
from ptmcli.models.attention import CrossAttention, SelfAttention
from ptmcli.models.dropout import Dropout
from ptmcli.models.layers import EncoderDecoderLM, FeedForward, residual
from ptmcli.models.recompute import RMSNorm
from ptmcli.models.rows import PackedRows


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int):
    """Bucket of each relative position (key position - query position), as in the T5 reference: exact buckets
    for small distances, logarithmically wider ones up to `max_distance`, beyond which all share the last.
    Bidirectional: half the buckets for keys after the query. Causal: only keys at or before the query count."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket += (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    large = (
        exact
        + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    large = large.clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
    def __init__(self, arch: T5Arch, bidirectional: bool):
        super().__init__()
        self.bias = nn.Embedding(arch.relative_buckets, arch.num_heads)
        self.bidirectional, self.buckets, self.max_distance = (
            bidirectional,
            arch.relative_buckets,
            arch.relative_max_distance,
        )

    def forward(self, queries: int, keys: int, offset: int, device: torch.device) -> torch.Tensor:
        """(1, nh, queries, keys) bias; query i sits at position offset + i."""
        q = torch.arange(offset, offset + queries, device=device)[:, None]
        k = torch.arange(keys, device=device)[None, :]
        bucket = relative_position_bucket(k - q, self.bidirectional, self.buckets, self.max_distance)
        return self.bias(bucket).permute(2, 0, 1)[None]


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """T5's activations outgrow fp16; keep them finite as the reference implementations do."""
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


def _fp16_autocast(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16


class Block(nn.Module):
    """Pre-norm layer: x += attn(norm(x)); [x += cross(norm(x), memory)]; x += ffn(norm(x))."""

    def __init__(self, arch: T5Arch, decoder: bool):
        super().__init__()
        h = arch.hidden_size
        self.attention_norm = RMSNorm(h, arch.layer_norm_eps)
        self.attention = SelfAttention(h, arch.num_heads, arch.attention_dropout, bias=False, scale=1.0)
        if decoder:
            self.cross_norm = RMSNorm(h, arch.layer_norm_eps)
            # T5's bench step kept 30 MB less (4 % of its peak) for ~3 % of its time; BART, at half of Hugging
            # Face's memory without it, keeps them (its speed bar is nearer)
            self.cross = CrossAttention(
                h, arch.num_heads, arch.attention_dropout, bias=False, scale=1.0, recompute_memory=True
            )
        self.ffn_norm = RMSNorm(h, arch.layer_norm_eps)
        gated = arch.feed_forward == "gated-gelu"
        self.ffn = FeedForward(
            h, arch.intermediate_size, bias=False, activation="gelu-tanh" if gated else "relu", gated=gated
        )
        self.dropout = Dropout(arch.dropout)

    def forward(self, x, bias, memory=None, memory_mask=None, cache=None, rows=None):
        # each norm is handed to the projection after it: fused, the normalised copy is not kept for the backward
        attended = self.attention(x, None, cache=cache, position_bias=bias, rows=rows, norm=self.attention_norm)
        x = _clamp_fp16(residual(x, self.dropout(attended)))
        if memory is not None:
            x = _clamp_fp16(
                residual(x, self.dropout(self.cross(x, memory, memory_mask, cache, rows=rows, norm=self.cross_norm)))
            )
        if _fp16_autocast(x):  # the feed-forward output overflows fp16: run it in fp32
            with torch.autocast("cuda", enabled=False):
                return _clamp_fp16(x + self.dropout(self.ffn(self.ffn_norm(x).float())).to(x.dtype))
        return _clamp_fp16(residual(x, self.dropout(self.ffn(x, norm=self.ffn_norm))))


def _mask_bias(bias: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def _prefix_length(layers: nn.ModuleList) -> int:
    """P, the positions prefix tuning puts before every layer's keys (0 without). They sit before the text, as a
    Hugging Face T5 places past keys: the text's tokens at P.., so that their distances to each other stay theirs,
    and every query sees the prefix."""
    prefix = layers[0].attention.prefix if len(layers) else None
    return 0 if prefix is None else prefix.length


def _before_prefix(allowed: torch.Tensor, P: int) -> torch.Tensor:
    """A (..., keys) boolean mask with P always-visible prefix keys put first."""
    return F.pad(allowed, (P, 0), value=True) if P else allowed


class T5(nn.Module):
    """The encoder: (B, T) ids -> (B, T, C) states after the final norm."""

    summary = "mean"  # no [CLS]-like token: sequence heads average the states

    def __init__(self, arch: T5Arch, vocab_size: int):
        super().__init__()
        self.arch, self.vocab_size = arch, vocab_size
        self.embeddings = nn.Embedding(vocab_size, arch.hidden_size)
        self.relative_bias = RelativeBias(arch, bidirectional=True)
        self.layers = nn.ModuleList(Block(arch, decoder=False) for _ in range(arch.num_layers))
        self.final_norm = RMSNorm(arch.hidden_size, arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        T, P = input_ids.shape[1], _prefix_length(self.layers)
        allowed = _before_prefix(attention_mask.bool(), P)[:, None, None, :] if attention_mask is not None else None
        bias = _mask_bias(self.relative_bias(T, P + T, P, input_ids.device), allowed)
        rows = PackedRows.of(attention_mask)
        x = self.dropout(self.embeddings(input_ids))
        x = x if rows is None else rows.pack(x)
        for layer in self.layers:
            x = layer(x, bias, rows=rows)
        x = self.dropout(self.final_norm(x))
        return x if rows is None else rows.unpack(x)


class Decoder(nn.Module):
    def __init__(self, arch: T5Arch):
        super().__init__()
        self.arch = arch
        self.relative_bias = RelativeBias(arch, bidirectional=False)
        self.layers = nn.ModuleList(Block(arch, decoder=True) for _ in range(arch.num_decoder_layers))
        self.final_norm = RMSNorm(arch.hidden_size, arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, x, memory, memory_mask, cache=None, keep=None) -> torch.Tensor:
        """x: (B, T, C) embedded decoder inputs; `cache` (decoding): one dict per layer; `keep`: (B, T) the
        positions whose states are needed (the others, trailing, mean nothing)."""
        T, P = x.shape[1], _prefix_length(self.layers)
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0  # the cache keeps no prefix
        causal = _before_prefix(torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past), P)
        bias = _mask_bias(self.relative_bias(T, P + past + T, P + past, x.device), causal[None, None])
        rows = PackedRows.of(keep)
        x = self.dropout(x if rows is None else rows.pack(x))
        for i, layer in enumerate(self.layers):
            x = layer(x, bias, memory, memory_mask, cache[i] if cache is not None else None, rows=rows)
        x = self.dropout(self.final_norm(x))
        return x if rows is None else rows.unpack(x)


class T5ForConditionalGeneration(EncoderDecoderLM):
    """Encoder + decoder. The decoder embeds with the encoder's matrix and the output projection is tied to it
    (scaled by hidden^-0.5, as T5 does when tying), so the matrix is stored once, under `encoder`; with
    `tied_head=false` (T5 v1.1) the projection is a matrix of its own, unscaled."""

    def __init__(self, arch: T5Arch, vocab_size: int):
        super().__init__()
        self.encoder = T5(arch, vocab_size)
        self.decoder = Decoder(arch)
        self.lm_head = None if arch.tied_head else nn.Linear(arch.hidden_size, vocab_size, bias=False)
        init_t5(self, arch)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(input_ids, None, attention_mask)

    def decoder_states(self, decoder_ids, memory, attention_mask, cache=None, keep=None) -> torch.Tensor:
        """(B, T) decoder ids -> (B, T, C), what the output projection reads (rescaled when it is tied)."""
        memory_mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        hidden = self.decoder(self.encoder.embeddings(decoder_ids), memory, memory_mask, cache, keep)
        return hidden if self.lm_head is not None else hidden * self.encoder.arch.hidden_size**-0.5

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.encoder.embeddings.weight


def init_t5(module: nn.Module, arch: T5Arch) -> None:
    """T5's initialisation (factor = init_std): every matrix N(0, factor / sqrt(fan_in)), embeddings N(0, factor)
    and query projections a further 1/sqrt(head size), which stands in for the missing attention scaling."""
    f, h = arch.init_std, arch.hidden_size
    head = h // arch.num_heads
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith("embeddings.weight"):
            nn.init.normal_(p, std=f)
        elif name.endswith("relative_bias.bias.weight"):
            nn.init.normal_(p, std=f * h**-0.5)
        else:
            std = f * p.shape[1] ** -0.5
            if name.endswith("attention.qkv.weight"):
                with torch.no_grad():
                    p.normal_(0, std)
                    p[:h].mul_(head**-0.5)
                continue
            if name.endswith("cross.query.weight"):
                std *= head**-0.5
            nn.init.normal_(p, std=std)


def build_pretraining(arch: T5Arch, vocab_size: int, objective) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(arch, vocab_size)


def build_encoder(arch: T5Arch, vocab_size: int) -> T5:
    encoder = T5(arch, vocab_size)
    init_t5(encoder, arch)
    return encoder


def build_seq2seq(arch: T5Arch, vocab_size: int) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(arch, vocab_size)
