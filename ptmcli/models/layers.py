"""Pieces shared by the model families: attention on `scaled_dot_product_attention` (with a KV cache for
decoding), feed-forward, the post-LN encoder layer (BERT, RoBERTa, ELECTRA), the pre-LN decoder block (GPT)
and the tied masked-LM head. Family files import from here, never from each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 mask of real tokens -> (B, 1, 1, T) boolean mask for SDPA, or None when nothing is padded.

    Returning None for unpadded batches lets SDPA pick its fastest kernel.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    `prefix`, when set (prefix tuning), is a callable giving extra key/value states (B, nh, P, hs) that every
    query may attend to; it is kept out of the module tree, since its owner registers its parameters.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = dropout
        self.prefix = None

    supports_prefix = True  # subclasses with their own attention may not honour `prefix`

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool = False, cache: dict | None = None
    ) -> torch.Tensor:
        """x: (B, T, C); mask: (B, 1, 1|T, T) boolean, True = may attend. Returns (B, T, C).

        `cache` (decoding): a dict holding this layer's keys/values of earlier positions; the new ones are
        appended, and the T new queries attend to everything cached plus, causally, to each other."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            past = k.shape[2] - T
            if causal and past:  # SDPA's is_causal aligns to the top-left corner; with a past it must be explicit
                mask = cached_causal_mask(T, past, x.device) if T > 1 else mask
                causal = False
        if self.prefix is not None:
            pk, pv = self.prefix(B)  # (B, nh, P, hs) each
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            mask = prefix_mask(mask, B, T, pk.shape[2], causal, x.device)
            causal = False  # folded into the explicit mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal and mask is None
        )
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def cached_causal_mask(T: int, past: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, past+T): new query t sees every cached key and the new keys up to itself."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)[None, None]


def prefix_mask(
    mask: torch.Tensor | None, B: int, T: int, P: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Extend a (B, 1, 1|T, T) mask with P always-visible prefix keys: (B, 1, 1|T, P+T)."""
    if mask is None and not causal:
        return None
    rows = T if causal or (mask is not None and mask.shape[2] == T) else 1
    out = torch.ones(B, 1, rows, P + T, dtype=torch.bool, device=device)
    if causal:
        out[..., P:] = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if mask is not None:
        out[..., P:] &= mask
    return out


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer (BERT, RoBERTa, ELECTRA): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(
        self, hidden: int, heads: int, intermediate: int, dropout: float, attention_dropout: float, eps: float
    ):
        super().__init__()
        self.attention = SelfAttention(hidden, heads, attention_dropout)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, intermediate)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm causal block (GPT-2): x = x + attn(LN(x)); x = x + ffn(LN(x))."""

    def __init__(
        self, hidden: int, heads: int, intermediate: int, dropout: float, attention_dropout: float, eps: float
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.attention = SelfAttention(hidden, heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, intermediate)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), None, causal=True, cache=cache))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (whose width may differ from the input's,
    as in ELECTRA's generator)."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, word_embeddings.embedding_dim)
        self.norm = nn.LayerNorm(word_embeddings.embedding_dim, eps=eps)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, V)"""
        return F.linear(self.norm(F.gelu(self.dense(hidden))), self.word_embeddings.weight, self.bias)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> (B, C): the state of each row's last real token (right padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.long().sum(1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def init_normal(module: nn.Module, std: float) -> None:
    """BERT/GPT-style initialisation: N(0, std) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
