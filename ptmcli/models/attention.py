"""Attention for every family: `attention` on `scaled_dot_product_attention` (written out on a CPU where SDPA's fused
kernel cannot serve), multi-head self-attention with a fused query-key-value projection and a KV cache for decoding,
and decoder-to-encoder cross-attention."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.dropout import dropout_matmul
from ptmcli.models.memory_attention import MemorySpaceAttention, cheaper
from ptmcli.models.recompute import (
    BiasedAttention,
    ProjectedInBackward,
    RebuiltAttention,
    RMSNorm,
    fp32_weights_attention,
    normed_projection,
)
from ptmcli.models.rows import PackedRows, QueryRows


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 1/0 mask of real tokens -> (B, 1, 1, T) boolean mask for SDPA, or None when nothing is padded.

    Returning None for unpadded batches lets SDPA pick its fastest kernel.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    backward_follows: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of (B, nh, T, hs) queries and (B, nh, S, hs) keys/values -> (B, nh, T, hs).
    On a CPU, SDPA runs its reference computation where its fused kernel cannot serve: with dropout (drawing a slow
    mask) and with an additive mask that needs a gradient (T5's position bias). There the same computation is written
    out here, faster: the attention weights drop through `dropout_matmul` (cheap masks, the dropped copy never kept),
    and an fp32 bias is added in place, with no scaling pass at a scale of 1 (T5's encoder attention, forward +
    backward at its bench shapes: 13.3-13.8 ms against SDPA's 15.7, `python tests/bench/attention_bias.py`). Without
    dropout, self-attention with such a bias runs `BiasedAttention` instead (`weights_rebuilt`), which keeps less.

    In bf16 (or fp16) on a CPU without dropout, where the inputs need gradients (training), it runs `RebuiltAttention`
    instead: SDPA's fused kernel has a slow backward pass there. Like that kernel it keeps q, k, v and one number per
    query, and computes the scores and softmax in fp32 (from q and k upcast), the weights cast down for their
    product with v: forward + backward of T5's cross-attention at its bench shapes 5.1-5.5 against 6.8-7.4 ms, of a
    128-token causal self-attention 20-26 against 27-28 ms, as close to fp64's gradients (`python
    tests/bench/attention_bf16.py`). `backward_follows` (`ProjectedInBackward`'s second pass, whose backward pass
    comes at once): the same left to autograd, which keeps the weights for that moment (3.8 and 12.2 ms). Without
    gradients (evaluation, generation, `ProjectedInBackward`'s first pass: the same function to bf16's rounding) the
    fused kernel serves, its forward pass the faster (0.6 against 1.3 ms, 1.6 against 4.0), and under torch.compile."""
    cpu, half = q.device.type == "cpu", q.dtype in (torch.bfloat16, torch.float16)
    recorded = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # torch.compile is handed SDPA, which it knows
    if cpu and half and dropout_p == 0.0 and recorded and not torch.compiler.is_compiling():
        bias = _additive(mask, is_causal, q.shape[-2], k.shape[-2], q.device)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        lean = fp32_weights_attention if backward_follows else RebuiltAttention.apply
        return lean(q, k, v, bias, scale)
    bias_with_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad and q.dtype == torch.float32
    if not cpu or (dropout_p == 0.0 and not bias_with_grad):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    scores = q @ k.transpose(-2, -1)  # (B, nh, T, S)
    if scale != 1.0:
        scores.mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        scores = scores.add_(mask)
    return dropout_matmul(scores.softmax(-1), v, dropout_p)


def _additive(mask: torch.Tensor | None, causal: bool, queries: int, keys: int, device) -> torch.Tensor | None:
    """An SDPA mask (boolean, True = may attend, or additive) and causality as one fp32 additive bias, or None."""
    bias = None
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
    elif mask is not None:
        bias = mask.float()  # a bias that needs a gradient gets it through the cast
    if causal:
        above = torch.full((queries, keys), float("-inf"), device=device).triu_(1)
        bias = above if bias is None else bias + above
    return bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    `prefix`, when set (prefix tuning), is a callable giving extra key/value states (B, nh, P, hs) that every
    query may attend to; it is kept out of the module tree, since its owner registers its parameters.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, bias: bool = True, scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = dropout
        self.scale = scale  # None = 1/sqrt(head size); T5 folds the scaling into its initialisation (1.0)
        self.prefix = None

    supports_prefix = True  # subclasses with their own attention may not honour `prefix`

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
        cache: dict | None = None,
        position_bias: torch.Tensor | None = None,
        rows: PackedRows | None = None,
        queries: QueryRows | None = None,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C), or with `rows` a padded batch's real tokens (N, C); mask: (B, 1, 1|T, T) boolean,
        True = may attend. Returns what x is shaped like, or with `queries` the (N_wanted, C) outputs at those rows
        alone (every position still serves as a key and value). `norm`: applied to x first (T5's pre-norm).

        `cache` (decoding): a dict holding this layer's keys/values of earlier positions; the new ones are
        appended, and the T new queries attend to everything cached plus, causally, to each other.
        `position_bias` (T5): (1|B, nh, T, S) added to the scores; it must already hold -inf where `mask` and
        causality forbid, since both are folded into it."""
        projected = normed_projection(self.qkv, x, norm)
        qkv = projected if rows is None else rows.unpack(projected)
        dropout = self.dropout if self.training else 0.0
        if position_bias is not None and cache is None and self.prefix is None and queries is None:
            if weights_rebuilt(qkv, position_bias, dropout):
                head_size = qkv.shape[-1] // 3 // self.num_heads
                scale = head_size**-0.5 if self.scale is None else self.scale
                y = BiasedAttention.apply(qkv, position_bias, self.num_heads, scale)
                return self.out(y if rows is None else rows.pack(y))
        B, T, C = *qkv.shape[:2], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)
        if queries is not None:
            q = queries.slotted(projected[..., :C], B)  # (B, M, C)
        q, k, v = (
            t.view(B, t.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T|M, hs)
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
            mask = prefix_mask(mask, B, q.shape[2], pk.shape[2], causal, x.device)
            causal = False  # folded into the explicit mask
        if position_bias is not None:
            mask, causal = position_bias.to(q.dtype), False
        y = attention(q, k, v, mask, dropout, causal and mask is None, self.scale)
        if queries is not None:
            return self.out(queries.unslotted(_merge_heads(y, None)))
        return self.out(_merge_heads(y, rows))


def weights_rebuilt(qkv: torch.Tensor, bias: torch.Tensor, dropout_p: float) -> bool:
    """Whether self-attention with this position bias runs `BiasedAttention`: on a CPU, from an fp32 or bf16
    projection, without dropout, and with an fp32 bias that needs a gradient, for which SDPA has no fused CPU kernel;
    not while torch.compile traces the model, which gets the plain computation to fuse."""
    cpu = qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.bfloat16) and bias.dtype == torch.float32
    return cpu and dropout_p == 0.0 and bias.requires_grad and not torch.compiler.is_compiling()


def _merge_heads(y: torch.Tensor, rows: PackedRows | None) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C), or (N, C) for the real tokens of `rows`."""
    B, nh, T, hs = y.shape
    y = y.transpose(1, 2).reshape(B, T, nh * hs)
    return y if rows is None else rows.pack(y)


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder, keys/values from the encoder output. When
    decoding with a cache, the encoder's keys/values are projected once and kept. Without a cache, where few decoder
    tokens attend to many encoder ones (T5's span corruption), the queries attend in the encoder states' own space
    instead and keys and values are never made (`MemorySpaceAttention`). `recompute_memory`: elsewhere in training,
    project them again in the backward pass instead of keeping them (T5)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        dropout: float,
        bias: bool = True,
        scale: float | None = None,
        recompute_memory: bool = False,
    ):
        super().__init__()
        self.num_heads, self.recompute_memory = num_heads, recompute_memory
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout, self.scale = dropout, scale

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor | None,
        cache: dict | None = None,
        rows: PackedRows | None = None,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) decoder states, or with `rows` their real tokens (N, C); memory: (B, S, C) encoder
        states; mask: (B, 1, 1, S) or None; `norm`: applied to x first (T5's pre-norm)."""
        query = normed_projection(self.query, x, norm)
        query = query if rows is None else rows.unpack(query)
        dropout = self.dropout if self.training else 0.0
        recompute = self.recompute_memory and dropout == 0.0 and isinstance(self.kv, nn.Linear)
        if cache is None and self._in_memory_space(query, memory, mask, dropout):
            scale = self.scale if self.scale is not None else (query.shape[-1] // self.num_heads) ** -0.5
            y = MemorySpaceAttention.apply(query, memory, self.kv.weight, mask, self.num_heads, scale)
            return self.out(y if rows is None else rows.pack(y))
        if cache is None and torch.is_grad_enabled() and recompute and not torch.compiler.is_compiling():
            # Every decoder layer's keys and values of the encoder's states, (B, S, 2C), would be kept for the
            # backward pass with what the attention keeps; projected again there instead (the encoder's states are
            # kept anyway), one projection of the memory more per layer. Not with attention dropout (the second
            # pass would draw other masks), nor under torch.compile (it fuses its own)
            attend = functools.partial(self._attend, mask=mask, backward_follows=True)
            y = ProjectedInBackward.apply(attend, query, memory, self.kv.weight, self.kv.bias)
        elif cache is not None and "memory_k" in cache:
            y = self._attend(query, (cache["memory_k"], cache["memory_v"]), mask, dropout)
        else:
            kv = self.kv(memory)
            if cache is not None:
                cache["memory_k"], cache["memory_v"] = kv.chunk(2, dim=-1)
            y = self._attend(query, kv, mask, dropout)
        return self.out(_merge_heads(y, rows))

    def _in_memory_space(
        self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None, dropout: float
    ) -> bool:
        """Whether to attend in the encoder states' space (`MemorySpaceAttention`): where that is less work (few decoder
        tokens against many encoder ones, as in T5's span corruption), on a CPU in fp32, without attention dropout,
        key-value biases or adapters on the projection; not under torch.compile."""
        queries, width = query.shape[1:]
        plain = isinstance(self.kv, nn.Linear) and self.kv.bias is None and dropout == 0.0
        fp32_cpu = query.device.type == "cpu" and query.dtype == memory.dtype == self.kv.weight.dtype == torch.float32
        exact = (mask is None or mask.dtype == torch.bool) and not torch.is_autocast_enabled("cpu")
        return (
            plain
            and fp32_cpu
            and exact
            and not torch.compiler.is_compiling()
            and cheaper(queries, memory.shape[1], width, self.num_heads)
        )

    def _attend(self, query, kv, mask: torch.Tensor | None, dropout: float = 0.0, backward_follows=False):
        """(B, T, C) queries attending to keys and values, (B, S, 2C) or a pair of (B, S, C) -> (B, nh, T, hs)."""
        B, C = query.shape[0], query.shape[-1]
        heads = lambda t: t.view(B, -1, self.num_heads, C // self.num_heads).transpose(1, 2)  # noqa: E731
        k, v = kv.split(C, dim=-1) if torch.is_tensor(kv) else kv
        return attention(heads(query), heads(k), heads(v), mask, dropout, False, self.scale, backward_follows)


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
