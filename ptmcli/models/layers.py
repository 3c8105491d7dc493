"""Pieces shared by the model families: feed-forward, the post-LN encoder layer (BERT, RoBERTa, ELECTRA), the pre-LN
decoder block (GPT) and the tied masked-LM head, and the encoder-decoder frame T5 and BART fill in; attention is in
`models/attention.py`. Family files import from these, never from each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.attention import SelfAttention, padding_mask
from ptmcli.models.dropout import Dropout
from ptmcli.models.recompute import GELU_APPROXIMATION, GeluThenLinear, RMSNorm, UpGeluDown, normed_projection
from ptmcli.models.rows import PackedRows, QueryRows
from ptmcli.models.vocab_loss import (
    IGNORE,
    VocabLoss,
    in_cpu_autocast,
    projected_cross_entropy,
    targeted_cross_entropies,
)


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


# Under a CPU's autocast the bf16 products go to oneDNN, which builds a kernel for every shape it meets and keeps it
# (~0.5-1 MB each). A padded batch is as long as its longest row, so attention (and an encoder-decoder's cross-attention
# projections) met new shapes at most steps, and bf16 runs grew where fp32 runs stay flat: BART-mini's recipe peaked at
# 1,190 MB at step 20 and 1,353-1,371 at step 200 (fp32: 1,002-1,040). Padded further to a multiple of
# LENGTH_MULTIPLE, such batches meet a handful of lengths: 1,052-1,066 and 1,100-1,108 MB, at the same speed
# (docs/results.md, stop 59).
LENGTH_MULTIPLE = 8


def padded_to_whole_length(x: torch.Tensor, value, limit: int | None = None) -> torch.Tensor:
    """(B, T, ...) x right-padded along T with `value` to a multiple of LENGTH_MULTIPLE, at most `limit`."""
    T = x.shape[1]
    length = -(-T // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    length = max(T, min(length, limit)) if limit is not None else length
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, length - T), value=value) if length > T else x


def padded_under_cpu_autocast(x: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether a batch goes to a whole length: it has padding and its products run under a CPU's autocast."""
    return attention_mask is not None and in_cpu_autocast(x) and not bool(attention_mask.all())


def whole_length_inputs(input_ids, token_type_ids, attention_mask, limit: int):
    """An encoder's inputs, a padded batch under a CPU's autocast padded further to a whole length (LENGTH_MULTIPLE,
    at most `limit` positions), so that the encoder and a head on its states meet a handful of shapes; else as they
    are. The added positions are padding like the rest: no real token's state changes."""
    if not padded_under_cpu_autocast(input_ids, attention_mask):
        return input_ids, token_type_ids, attention_mask
    whole = [None if x is None else padded_to_whole_length(x, 0, limit) for x in (input_ids, token_type_ids)]
    return *whole, padded_to_whole_length(attention_mask, 0, limit)


def run_encoder_layers(
    layers: nn.ModuleList, x: torch.Tensor, attention_mask: torch.Tensor | None, outputs: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T, C) through `EncoderLayer`s; a padded batch runs on its real tokens (`PackedRows`), and the states at
    its padding positions mean nothing; under a CPU's autocast its layers run at a whole length (`LENGTH_MULTIPLE`).
    With `outputs`, a (B, T) bool mask of real tokens, returns only the states there, (N, C) in row-major order
    (`hidden[outputs]`), and the last layer computes no others (`QueryRows`)."""
    T = x.shape[1]
    if padded_under_cpu_autocast(x, attention_mask):
        # a padded batch at a whole length (`LENGTH_MULTIPLE`): the added positions are padding like the rest
        x, attention_mask = padded_to_whole_length(x, 0), padded_to_whole_length(attention_mask, 0)
        outputs = None if outputs is None else padded_to_whole_length(outputs, False)
    mask = padding_mask(attention_mask)
    rows = PackedRows.of(attention_mask) if mask is not None else None
    queries = QueryRows.of(outputs, rows)
    x = x if rows is None else rows.pack(x)
    for i, layer in enumerate(layers):
        x = layer(x, mask, rows=rows, queries=queries if i == len(layers) - 1 else None)
    if queries is not None and len(layers):
        return x
    x = x if rows is None else rows.unpack(x)
    if outputs is not None:
        return x[outputs]
    return x if x.shape[1] == T else x[:, :T]


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
    `output_bias`: next-token logits, or the summed cross-entropies of targets. `max_length`: the most positions
    the encoder or the decoder can take (learned positions), None where any length goes."""

    output_bias = None
    max_length: int | None = None

    def decode(self, decoder_ids, memory, attention_mask, cache=None) -> torch.Tensor:
        """(B, T) decoder ids -> (B, T, V) next-token logits."""
        hidden = self.decoder_states(decoder_ids, memory, attention_mask, cache)
        return F.linear(hidden, self.output_weight, self.output_bias)

    def forward(
        self, input_ids, attention_mask, decoder_input_ids, targets: list[torch.Tensor] | None = None, predict=False
    ) -> torch.Tensor | list[VocabLoss]:
        """Logits (B, T, V); with `targets` (a list of (B, T) label tensors) their summed cross-entropies instead,
        computed only where each has labels and without the whole logits tensor."""
        if targets is None:
            return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        if in_cpu_autocast(input_ids):
            input_ids, attention_mask, decoder_input_ids, targets = self.whole_lengths(
                input_ids, attention_mask, decoder_input_ids, targets
            )
        memory = self.encode(input_ids, attention_mask)
        hidden = self.decoder_states(decoder_input_ids, memory, attention_mask, keep=up_to_last_target(targets))
        return targeted_cross_entropies(hidden, self.output_weight, self.output_bias, targets, predict)

    def whole_lengths(self, input_ids, attention_mask, decoder_input_ids, targets: list[torch.Tensor]):
        """The inputs of a padded batch padded further to a whole multiple of LENGTH_MULTIPLE positions (encoder and
        decoder each): masked positions in the encoder, positions after the last target in the decoder, neither
        changing any state or loss. A side without padding keeps its length, which the data fixes (T5's span
        corruption): padding it would add work and no fewer shapes."""
        if attention_mask is not None and not bool(attention_mask.all()):
            input_ids = padded_to_whole_length(input_ids, 0, self.max_length)
            attention_mask = padded_to_whole_length(attention_mask, 0, self.max_length)
        if not bool(torch.stack([t[:, -1] != IGNORE for t in targets]).any(0).all()):
            decoder_input_ids = padded_to_whole_length(decoder_input_ids, 0, self.max_length)
            targets = [padded_to_whole_length(t, IGNORE, self.max_length) for t in targets]
        return input_ids, attention_mask, decoder_input_ids, targets

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.decoder.layers]
