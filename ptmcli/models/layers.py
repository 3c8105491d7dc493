"""Pieces shared by the model families: attention on `scaled_dot_product_attention` (with a KV cache for
decoding), feed-forward, the post-LN encoder layer (BERT, RoBERTa, ELECTRA), the pre-LN decoder block (GPT)
and the tied masked-LM head, and the encoder-decoder frame T5 and BART fill in. Family files import from here, never
from each other."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.dropout import Dropout, dropout_matmul
from ptmcli.models.recompute import (
    GELU_APPROXIMATION,
    BiasedAttention,
    GeluThenLinear,
    ProjectedInBackward,
    RMSNormThenLinear,
    UpGeluDown,
    rms_norm,
)
from ptmcli.models.rows import PackedRows, QueryRows
from ptmcli.models.vocab_loss import IGNORE, VocabLoss, projected_cross_entropy, targeted_cross_entropies


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
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of (B, nh, T, hs) queries and (B, nh, S, hs) keys/values -> (B, nh, T, hs).
    On a CPU, SDPA runs its reference computation where its fused kernel cannot serve: with dropout (drawing a slow
    mask) and with an additive mask that needs a gradient (T5's position bias). There the same computation is written
    out here, faster: the attention weights drop through `dropout_matmul` (cheap masks, the dropped copy never kept),
    and an fp32 bias is added in place, with no scaling pass at a scale of 1 (T5's encoder attention, forward +
    backward at its bench shapes: 13.3-13.8 ms against SDPA's 15.7, `python tests/bench/attention_bias.py`). Without
    dropout, self-attention with such a bias runs `BiasedAttention` instead (`weights_rebuilt`), which keeps less."""
    # in fp32 only: in bf16 SDPA's reference computes its softmax in fp32, closer to fp64 than a bf16 softmax
    bias_with_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad and q.dtype == torch.float32
    if q.device.type != "cpu" or (dropout_p == 0.0 and not bias_with_grad):
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
    """Whether self-attention with this position bias runs `BiasedAttention`: on a CPU, in fp32 (in bf16 SDPA's
    reference computes its softmax in fp32), without dropout, and with a bias that needs a gradient, for which SDPA
    has no fused CPU kernel; not while torch.compile traces the model, which gets the plain computation to fuse."""
    cpu_fp32 = qkv.device.type == "cpu" and qkv.dtype == torch.float32 and bias.dtype == torch.float32
    return cpu_fp32 and dropout_p == 0.0 and bias.requires_grad and not torch.compiler.is_compiling()


def _merge_heads(y: torch.Tensor, rows: PackedRows | None) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C), or (N, C) for the real tokens of `rows`."""
    B, nh, T, hs = y.shape
    y = y.transpose(1, 2).reshape(B, T, nh * hs)
    return y if rows is None else rows.pack(y)


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder, keys/values from the encoder output. When
    decoding with a cache, the encoder's keys/values are projected once and kept. `recompute_memory`: in training,
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
        if cache is None and torch.is_grad_enabled() and recompute and not torch.compiler.is_compiling():
            # Every decoder layer's keys and values of the encoder's states, (B, S, 2C), would be kept for the
            # backward pass with what the attention keeps; projected again there instead (the encoder's states are
            # kept anyway), one projection of the memory more per layer. Not with attention dropout (the second
            # pass would draw other masks), nor under torch.compile (it fuses its own)
            attend = functools.partial(self._attend, mask=mask)
            y = ProjectedInBackward.apply(attend, query, memory, self.kv.weight, self.kv.bias)
        elif cache is not None and "memory_k" in cache:
            y = self._attend(query, (cache["memory_k"], cache["memory_v"]), mask, dropout)
        else:
            kv = self.kv(memory)
            if cache is not None:
                cache["memory_k"], cache["memory_v"] = kv.chunk(2, dim=-1)
            y = self._attend(query, kv, mask, dropout)
        return self.out(_merge_heads(y, rows))

    def _attend(self, query, kv, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
        """(B, T, C) queries attending to keys and values, (B, S, 2C) or a pair of (B, S, C) -> (B, nh, T, hs)."""
        B, C = query.shape[0], query.shape[-1]
        heads = lambda t: t.view(B, -1, self.num_heads, C // self.num_heads).transpose(1, 2)  # noqa: E731
        k, v = kv.split(C, dim=-1) if torch.is_tensor(kv) else kv
        return attention(heads(query), heads(k), heads(v), mask, dropout, False, self.scale)


def normed_projection(linear: nn.Module, x: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
    """linear(norm(x)), fused where an `RMSNorm` meets a plain `nn.Linear` (not one LoRA or an adapter wraps), so
    the normalised x is not kept for the backward pass (`RMSNormThenLinear`)."""
    if norm is None:
        return linear(x)
    if isinstance(norm, RMSNorm) and isinstance(linear, nn.Linear):
        return RMSNormThenLinear.apply(x, norm.weight, norm.eps, linear.weight, linear.bias)
    return linear(norm(x))


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


def residual(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + update, the sum written into `update`, a sublayer's fresh output (a projection's, or its dropped copy),
    which nothing keeps for the backward pass: the sum needs no memory of its own, and the output is not freed to
    leave a hole in the heap that the next, larger tensors cannot use (with the ReLU in place, T5's bench peak ~25
    MB lower). Equal to x + update bit for bit (addition commutes). A new tensor, as x + update makes it, where the
    dtypes differ (autocast: a half-precision update to an fp32 residual stream) or `update` is a view (a biased
    projection of a 3-D input, a custom Function's output), which autograd cannot, or only at a cost, let be written
    over."""
    if update.dtype == x.dtype and update.shape == x.shape and not update._is_view():
        return update.add_(x)
    return x + update


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, which GPT-2 and T5 v1.1 were trained with."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu-tanh": gelu_tanh, "relu": F.relu}


class FeedForward(nn.Module):
    """down(act(up(x))), or with `gated` (T5 v1.1's gated-GELU) down(act(gate(x)) * up(x)). `recompute_up`: keep
    only x for the backward pass and compute up(x) again there (GELU activations; XLNet)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = True,
        activation: str = "gelu",
        gated: bool = False,
        recompute_up: bool = False,
    ):
        super().__init__()
        self.recompute_up = recompute_up
        self.up = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=bias) if gated else None
        self.down = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation, self.approximate = ACTIVATIONS[activation], GELU_APPROXIMATION.get(activation)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """down(act(up(x))), or of norm(x) with `norm` (T5's pre-norm)."""
        if self.activation is F.relu and self.gate is None:
            # in place: its backward reads only its output, and up's output is kept by none
            return self.down(F.relu(normed_projection(self.up, x, norm), inplace=True))
        x = x if norm is None else norm(x)
        if self.gate is not None:
            return self.down(self.activation(self.gate(x)) * self.up(x))
        plain = isinstance(self.down, nn.Linear)  # not when LoRA or an adapter wraps it
        if self.approximate is not None and plain and self.recompute_up and isinstance(self.up, nn.Linear):
            up, down = self.up, self.down
            return UpGeluDown.apply(x, up.weight, up.bias, down.weight, down.bias, self.approximate)
        if self.approximate is not None and plain:
            return GeluThenLinear.apply(self.up(x), self.down.weight, self.down.bias, self.approximate)
        return self.down(self.activation(self.up(x)))


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction and no bias; computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer (BERT, RoBERTa, ELECTRA): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        intermediate: int,
        dropout: float,
        attention_dropout: float,
        eps: float,
        activation: str = "gelu",
    ):
        super().__init__()
        self.attention = SelfAttention(hidden, heads, attention_dropout)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, intermediate, activation=activation)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rows: PackedRows | None = None,
        queries: QueryRows | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) or packed (N, C) -> the same, or with `queries` (N_wanted, C) at those rows only."""
        attended = self.attention(x, mask, rows=rows, queries=queries)
        x = self.attention_norm(residual(x if queries is None else queries.take(x), self.dropout(attended)))
        return self.ffn_norm(residual(x, self.dropout(self.ffn(x))))


def run_encoder_layers(
    layers: nn.ModuleList, x: torch.Tensor, attention_mask: torch.Tensor | None, outputs: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T, C) through `EncoderLayer`s; a padded batch runs on its real tokens (`PackedRows`), and the states at
    its padding positions mean nothing. With `outputs`, a (B, T) bool mask of real tokens, returns only the
    states there, (N, C) in row-major order (`hidden[outputs]`), and the last layer computes no others
    (`QueryRows`)."""
    mask = padding_mask(attention_mask)
    rows = PackedRows.of(attention_mask) if mask is not None else None
    queries = QueryRows.of(outputs, rows)
    x = x if rows is None else rows.pack(x)
    for i, layer in enumerate(layers):
        x = layer(x, mask, rows=rows, queries=queries if i == len(layers) - 1 else None)
    if queries is not None and len(layers):
        return x
    x = x if rows is None else rows.unpack(x)
    return x if outputs is None else x[outputs]


def layer_stack(arch, layer: type[nn.Module] | None = None, activation: str = "gelu") -> nn.ModuleList:
    """`arch.num_layers` layers of the sizes an architecture dataclass gives: post-LN `EncoderLayer`s (BERT,
    RoBERTa, BART's encoder) unless `layer` names another class of the same signature (GPT's `DecoderBlock`)."""
    layer = layer or EncoderLayer
    return nn.ModuleList(
        layer(
            arch.hidden_size,
            arch.num_heads,
            arch.intermediate_size,
            arch.dropout,
            arch.attention_dropout,
            arch.layer_norm_eps,
            activation,
        )
        for _ in range(arch.num_layers)
    )


class DecoderBlock(nn.Module):
    """Pre-LayerNorm causal block (GPT-2): x = x + attn(LN(x)); x = x + ffn(LN(x))."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        intermediate: int,
        dropout: float,
        attention_dropout: float,
        eps: float,
        activation: str = "gelu",
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.attention = SelfAttention(hidden, heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, intermediate, activation=activation)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None, rows: PackedRows | None = None) -> torch.Tensor:
        x = residual(x, self.dropout(self.attention(self.attention_norm(x), None, causal=True, cache=cache, rows=rows)))
        return residual(x, self.dropout(self.ffn(self.ffn_norm(x))))


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings (whose width may differ from the input's,
    as in ELECTRA's generator)."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, word_embeddings.embedding_dim)
        self.norm = nn.LayerNorm(word_embeddings.embedding_dim, eps=eps)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, E): what the tied projection reads."""
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, V)"""
        return F.linear(self.transform(hidden), self.word_embeddings.weight, self.bias)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, predict=False, sample: float = 0.0) -> VocabLoss:
        """The summed cross-entropy of (N,) targets from (N, C) states, without the (N, V) logits (argmax with
        `predict`, samples at temperature `sample` > 0)."""
        states = self.transform(hidden)
        return projected_cross_entropy(states, self.word_embeddings.weight, self.bias, targets, predict, sample)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, T, C) -> (B, C): the first token's state (`cls`) or the mean over real tokens (`mean`)."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


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


def up_to_last_target(targets: list[torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: the decoder positions up to each row's last target in any of `targets`. Causal attention never
    lets a later position reach an earlier one, so the trailing positions after it (padding) need no state."""
    labelled = torch.stack([t != IGNORE for t in targets]).any(0)
    T = labelled.shape[1]
    last = T - 1 - labelled.flip(1).int().argmax(1)  # a row without targets keeps everything (argmax 0)
    return torch.arange(T, device=labelled.device) <= last[:, None]


class EncoderDecoderLM(nn.Module):
    """What T5 and BART share around their own `encode`, `decoder_states` (the states the output projection
    reads; with `keep`, (B, T) bool, only those positions' states are computed) and `output_weight` /
    `output_bias`: next-token logits, or the summed cross-entropies of targets."""

    output_bias = None

    def decode(self, decoder_ids, memory, attention_mask, cache=None) -> torch.Tensor:
        """(B, T) decoder ids -> (B, T, V) next-token logits."""
        hidden = self.decoder_states(decoder_ids, memory, attention_mask, cache)
        return F.linear(hidden, self.output_weight, self.output_bias)

    def forward(
        self, input_ids, attention_mask, decoder_input_ids, targets: list[torch.Tensor] | None = None, predict=False
    ) -> torch.Tensor | list[VocabLoss]:
        """Logits (B, T, V); with `targets` (a list of (B, T) label tensors) their summed cross-entropies instead,
        computed only where each has labels and without the whole logits tensor."""
        memory = self.encode(input_ids, attention_mask)
        if targets is None:
            return self.decode(decoder_input_ids, memory, attention_mask)
        hidden = self.decoder_states(decoder_input_ids, memory, attention_mask, keep=up_to_last_target(targets))
        return targeted_cross_entropies(hidden, self.output_weight, self.output_bias, targets, predict)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.decoder.layers]
