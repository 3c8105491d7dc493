"""XLNet (Yang et al., 2019): permutation language modelling with two-stream self-attention.

Each layer runs two streams with the same weights. The content stream h_i encodes token i and what it may
see; the query stream g_i starts from a learned vector, knows position i only through relative attention,
and predicts token i without seeing it. For a sampled factorisation order with ranks r:
  content stream: i attends to j iff r_j <= r_i   (itself included)
  query stream:   i attends to j iff r_j <  r_i   (never itself)
Keys and values always come from the content stream. Attention scores use Transformer-XL relative
positions: score(i, j) = (q_i + u) . k_j + (q_i + v) . R_{i-j}, with R a projected sinusoid of the distance.
Fine-tuning uses the content stream alone with ordinary bidirectional attention.
With `segment_encoding`, a score also gets (q_i + s) . e_{same(i,j)}, the paper's relative segment encoding:
whether i and j lie in the same segment, never which segment. Left out here: Transformer-XL segment
recurrence (memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.architectures import XlnetArch
from ptmcli.models.attention import SelfAttention
from ptmcli.models.dropout import Dropout, dropout_matmul
from ptmcli.models.layers import FeedForward, init_normal, residual
from ptmcli.models.vocab_loss import VocabLoss, projected_cross_entropy


def relative_sinusoid(T: int, dim: int, device: torch.device) -> torch.Tensor:
    """(2T-1, dim) sinusoid embeddings of the distances T-1, T-2, ..., -(T-1)."""
    distances = torch.arange(T - 1, -T, -1.0, device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2.0, device=device) / dim))
    angles = distances[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], -1)


def relative_shift(by_distance: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, 2T-1) scores by distance, column c for the distance T-1-c -> (B, nh, T, T) with [i, j] the score
    for the distance i - j, i.e. column T-1-i+j of row i. Done with views (Transformer-XL's shift): that element
    lies T-1 + i(2T-2) + j into the flattened rows, so a gather's copy and the input it keeps for its backward
    are never made."""
    B, nh, T, _ = by_distance.shape
    if T == 1:
        return by_distance
    flat = by_distance.reshape(B, nh, T * (2 * T - 1))  # a view while each (T, 2T-1) block is contiguous
    return flat[..., T - 1 : T - 1 + T * (2 * T - 2)].view(B, nh, T, 2 * T - 2)[..., :T]


class _GatherColumns(torch.autograd.Function):
    """`x.gather(-1, index)` that keeps only the index for its backward pass: torch's gather keeps its whole input,
    though the gradient needs only its shape (the query stream's (B, nh, M, 2T-1) scores by distance, 13 MB over
    the bench XLNet's layers: `tests/bench/profile_step.py xlnet --kept`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return x.gather(-1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.input_shape).scatter_add_(-1, index, grad), None


class _ByDistance(torch.autograd.Function):
    """Scores by distance, (q + v) . R for every head, query and distance: (B, nh, M, hs) queries, (nh, D, hs)
    positions -> (B, nh, M, D). One product per head over every query of the batch (`positions` broadcast over the
    batch would be copied B times into the product's input). For its backward it keeps `q + u`, which the content
    product keeps anyway, and `positions`: q + v = (q + u) + (v - u) is remade there, where the plain product would
    keep a copy of q + v of its own (19 MB over the bench XLNet's layers)."""

    @staticmethod
    def forward(ctx, q_u: torch.Tensor, v_minus_u: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, nh, M, hs = q_u.shape
        q_v = (q_u.transpose(0, 1) + v_minus_u[:, None, None]).reshape(nh, B * M, hs)
        ctx.save_for_backward(q_u, v_minus_u, positions)
        return (q_v @ positions.transpose(-1, -2)).view(nh, B, M, -1).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q_u, v_minus_u, positions = ctx.saved_tensors
        B, nh, M, hs = q_u.shape
        by_head = grad.transpose(0, 1).reshape(nh, B * M, -1)  # (nh, B*M, D), in the product's (autocast) dtype
        grad_q_v = (by_head @ positions.to(grad.dtype)).view(nh, B, M, hs).transpose(0, 1).to(q_u.dtype)
        grad_positions = None
        if ctx.needs_input_grad[2]:
            q_v = (q_u.transpose(0, 1) + v_minus_u[:, None, None]).reshape(nh, B * M, hs)
            grad_positions = (by_head.transpose(-1, -2) @ q_v.to(grad.dtype)).to(positions.dtype)
        grad_bias = grad_q_v.sum((0, 2)).to(v_minus_u.dtype) if ctx.needs_input_grad[1] else None
        return grad_q_v, grad_bias, grad_positions


class TwoStreamAttention(SelfAttention):
    """Relative multi-head attention for both streams. It subclasses `SelfAttention` for its `qkv`/`out`
    projections, so LoRA and adapters find it like any other attention layer."""

    supports_prefix = False

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, segments: bool = False):
        super().__init__(hidden_size, num_heads, dropout, bias=False)
        head_size = hidden_size // num_heads
        self.position = nn.Linear(hidden_size, hidden_size, bias=False)
        self.content_bias = nn.Parameter(torch.zeros(num_heads, head_size))  # u
        self.position_bias = nn.Parameter(torch.zeros(num_heads, head_size))  # v
        if segments:
            self.segment_bias = nn.Parameter(torch.zeros(num_heads, head_size))  # s
            self.segment_embed = nn.Parameter(torch.zeros(2, num_heads, head_size))  # e_same, e_different

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

    def _attend(self, q, k, v, positions, mask, different, query_at=None) -> torch.Tensor:
        """q: (B, nh, M, hs) queries at positions 0..T-1 (M = T), or at `query_at` (B, M); k, v: (B, nh, T, hs),
        contiguous; positions: (nh, 2T-1, hs); mask: (B, 1, M|1, T), True = may attend; different: (B, 1, T, T),
        True where two tokens lie in different segments, or None. Returns (B, M, C)."""
        B, nh, M, hs = q.shape
        T = k.shape[2]
        # contiguous, so that the product below keeps q_u itself (not a copy of its own) and _ByDistance the same
        q_u = (q + self.content_bias[:, None]).contiguous()
        scores = q_u @ k.transpose(-1, -2)
        # (B, nh, M, 2T-1); v enters as v - u so that the product can keep q + u instead of a q + v of its own
        by_distance = _ByDistance.apply(q_u, self.position_bias - self.content_bias, positions)
        if query_at is None:
            scores += relative_shift(by_distance)
        else:  # query m at position p reads the distance p - j from column T-1-p+j
            column = (T - 1) - query_at[:, None, :, None] + torch.arange(T, device=q.device)
            scores += _GatherColumns.apply(by_distance, column.expand(B, nh, M, T))
        if different is not None:
            by_segment = torch.einsum("bnid,snd->bnis", q + self.segment_bias[:, None], self.segment_embed)
            scores += torch.where(different, by_segment[..., 1:], by_segment[..., :1])
        # in place, and a finite fill instead of -inf: a query with nothing to attend to (first in the order) gets a
        # uniform row here instead of NaN, and zeros below; the softmax's output is the only (T x T) tensor kept
        scores = scores.mul_(1 / math.sqrt(hs)).masked_fill_(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, -1, dtype=torch.float32).to(v.dtype)
        attended = dropout_matmul(probs, v, self.dropout, self.training).masked_fill(~mask.any(-1, keepdim=True), 0.0)
        return attended.transpose(1, 2).reshape(B, M, nh * hs)

    def forward(self, h, g, content_mask, query_mask, sinusoid, different=None, query_at=None):
        """h: (B, T, C) content stream; g: (B, T, C) query stream, or (B, M, C) at the positions `query_at` (B, M)
        only, or None. Returns their attention outputs, each shaped like its stream."""
        if self.prefix is not None:
            raise ValueError("prefix tuning is not supported by XLNet's two-stream attention")
        C = h.shape[-1]
        q, k, v = (self._heads(t) for t in self.qkv(h).split(C, dim=2))
        # both streams' products take k and v as (B * nh, T, hs) blocks: made once here, not copied (and kept) twice
        k, v = k.contiguous(), v.contiguous()
        positions = self.position(sinusoid).view(-1, self.num_heads, C // self.num_heads).transpose(0, 1)
        h_out = self.out(self._attend(q, k, v, positions, content_mask, different))
        if g is None:
            return h_out, None
        query = self._heads(self.qkv(g)[..., :C])  # the query stream asks with its own state, never its content
        return h_out, self.out(self._attend(query, k, v, positions, query_mask, different, query_at))


class Layer(nn.Module):
    """Post-LN: x = LN(x + attn); x = LN(x + ffn(x)), applied to both streams with the same weights."""

    def __init__(self, arch: XlnetArch):
        super().__init__()
        self.attention = TwoStreamAttention(
            arch.hidden_size, arch.num_heads, arch.attention_dropout, segments=arch.segment_encoding
        )
        self.attention_norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        # both streams run it: keeping x alone halves what the layer keeps (docs/results.md, stop 44)
        self.ffn = FeedForward(arch.hidden_size, arch.intermediate_size, recompute_up=True)
        self.ffn_norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def _post(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(residual(x, self.dropout(attended)))
        return self.ffn_norm(residual(x, self.dropout(self.ffn(x))))

    def forward(self, h, g, content_mask, query_mask, sinusoid, different=None, query_at=None):
        h_att, g_att = self.attention(h, g, content_mask, query_mask, sinusoid, different, query_at)
        return self._post(h, h_att), (self._post(g, g_att) if g is not None else None)


class Embeddings(nn.Module):
    def __init__(self, arch: XlnetArch, vocab_size: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, arch.hidden_size)
        self.query = nn.Parameter(torch.zeros(arch.hidden_size))  # the query stream's starting state
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.word(input_ids))


class Xlnet(nn.Module):
    summary = "first"

    def __init__(self, arch: XlnetArch, vocab_size: int):
        super().__init__()
        self.arch = arch
        self.vocab_size = vocab_size
        self.embeddings = Embeddings(arch, vocab_size)
        self.layers = nn.ModuleList(Layer(arch) for _ in range(arch.num_layers))
        self.dropout = Dropout(arch.dropout)

    def _sinusoid(self, T: int, like: torch.Tensor) -> torch.Tensor:
        return self.dropout(relative_sinusoid(T, self.arch.hidden_size, like.device).to(like.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Content stream with bidirectional attention (fine-tuning): (B, T) -> (B, T, C). Segment ids count only
        with `segment_encoding`, and then only as same or different."""
        B, T = input_ids.shape
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        mask = real[:, None, None, :]
        different = None
        if self.arch.segment_encoding and token_type_ids is not None:
            different = (token_type_ids[:, :, None] != token_type_ids[:, None, :])[:, None]  # (B, 1, T, T)
        h = self.embeddings(input_ids)
        sinusoid = self._sinusoid(T, h)
        for layer in self.layers:
            h, _ = layer(h, None, mask, None, sinusoid, different)
        return h

    def two_stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rank: torch.Tensor,
        read: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams under the factorisation order given by `rank` (B, T). Returns (h, g): h (B, T, C); g
        (B, T, C), or with `read` (B, T) bool the query states of those positions in `read`'s row-major order
        (N, C). A query state depends on no other position's query state, so the query stream then runs at the
        read positions only (the targets, 1/K of the tokens), gathered into (B, M, C) with M the most any row
        reads (docs/results.md, stop 40: the pretraining step 1.56x as fast, 500 MB less at its peak)."""
        B, T = input_ids.shape
        real = attention_mask.bool()[:, None, :]
        earlier_or_same = rank[:, None, :] <= rank[:, :, None]  # [b, i, j]: j comes no later than i
        content_mask = (earlier_or_same & real)[:, None]
        query_mask = (earlier_or_same & (rank[:, None, :] != rank[:, :, None]) & real)[:, None]
        query_at = valid = None
        if read is not None:
            counts = read.sum(1)
            # each row's read positions in ascending order, then padding entries (position 0, dropped at the end)
            query_at = torch.sort((~read).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts.max())]
            valid = torch.arange(query_at.shape[1], device=read.device) < counts[:, None]
            query_at = query_at * valid
            query_mask = query_mask.gather(2, query_at[:, None, :, None].expand(B, 1, query_at.shape[1], T))
        h = self.embeddings(input_ids)
        g = self.embeddings.query.to(h.dtype).expand(B, T if read is None else query_at.shape[1], -1)
        g = self.embeddings.dropout(g)
        sinusoid = self._sinusoid(T, h)
        for layer in self.layers:
            h, g = layer(h, g, content_mask, query_mask, sinusoid, query_at=query_at)
        return h, (g if read is None else g[valid])


class XlnetForPermutationLM(nn.Module):
    def __init__(self, arch: XlnetArch, vocab_size: int):
        super().__init__()
        self.encoder = Xlnet(arch, vocab_size)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        init_normal(self, arch.init_std)
        nn.init.normal_(self.encoder.embeddings.query, std=arch.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rank: torch.Tensor,
        target_mask: torch.Tensor,
        targets: torch.Tensor | None = None,
        predict: bool = False,
    ) -> torch.Tensor | VocabLoss:
        """Logits (N, V) of the N target positions, read from the query stream, tied to the word embeddings.
        With `targets` (N,): their summed cross-entropy instead, the logits never held whole."""
        _, g = self.encoder.two_stream(input_ids, attention_mask, rank, read=target_mask)
        weight = self.encoder.embeddings.word.weight
        if targets is not None:
            return projected_cross_entropy(g, weight, self.lm_bias, targets, predict)
        return F.linear(g, weight, self.lm_bias)


def build_pretraining(arch: XlnetArch, vocab_size: int, objective) -> XlnetForPermutationLM:
    return XlnetForPermutationLM(arch, vocab_size)


def build_encoder(arch: XlnetArch, vocab_size: int) -> Xlnet:
    encoder = Xlnet(arch, vocab_size)
    init_normal(encoder, arch.init_std)
    nn.init.normal_(encoder.embeddings.query, std=arch.init_std)
    return encoder
