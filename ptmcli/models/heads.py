"""Task heads on any encoder that maps (input_ids, token_type_ids, attention_mask) -> (B, T, C) hidden states."""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.models.dropout import Dropout, dropout
from ptmcli.models.layers import last_token, pool, whole_length_inputs


def summarize(encoder: nn.Module, hidden: torch.Tensor, attention_mask, pooling: str) -> torch.Tensor:
    """(B, T, C) -> (B, C) features of a sequence head. `pooler`: the family's own summary (BERT's pooler; else its
    summary token or the mean); or the first token's state, the last real token's, the mean over tokens."""
    if pooling == "pooler":
        if getattr(encoder, "pooler", None) is not None:
            return encoder.pool(hidden)
        pooling = {"last": "last", "mean": "mean"}.get(getattr(encoder, "summary", "first"), "cls")
    if pooling == "last":
        return last_token(hidden, attention_mask)
    return pool(hidden, attention_mask, "mean" if pooling == "mean" else "cls")


def new_head(hidden: int, head: str, num_outputs: int) -> nn.Linear:
    linear = nn.Linear(hidden, 2 if head == "span" else num_outputs)
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


class FrozenAware(nn.Module):
    """An encoder that heads sit on. With `frozen=True` the encoder runs in eval mode under no_grad: feature
    extraction, head-only training."""

    def __init__(self, encoder: nn.Module, frozen: bool):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen feature extractor keeps dropout off
        return self

    def head_outputs(self, head: nn.Linear, kind: str, pooling: str, p: float, inputs: tuple) -> torch.Tensor:
        """`head` on the encoder's states of `inputs` (input_ids, token_type_ids, attention_mask), dropped out with
        probability `p`: (B, outputs) for a sequence head on the pooled features, else (B, T, outputs) on every
        position. Under a CPU's autocast a padded batch runs encoder and head at a whole length
        (`whole_length_inputs`), and the outputs come back at the batch's own length."""
        T = inputs[0].shape[1]
        input_ids, token_type_ids, attention_mask = whole_length_inputs(*inputs, self.encoder.arch.max_positions)
        with torch.no_grad() if self.frozen else torch.enable_grad():
            hidden = self.encoder(input_ids, token_type_ids, attention_mask)
            features = summarize(self.encoder, hidden, attention_mask, pooling) if kind == "sequence" else hidden
        outputs = head(dropout(features, p, self.training))
        return outputs if kind == "sequence" or outputs.shape[1] == T else outputs[:, :T]


class TaskModel(FrozenAware):
    """encoder + a head: `sequence` (pooled -> labels), `token` (every position -> labels) or `span` (start/end)."""

    def __init__(
        self,
        encoder: nn.Module,
        head: str,
        num_outputs: int,
        dropout: float,
        frozen: bool = False,
        pooling: str = "pooler",
    ):
        super().__init__(encoder, frozen)
        self.head_kind, self.pooling = head, pooling
        self.dropout = Dropout(dropout)
        self.head = new_head(encoder.arch.hidden_size, head, num_outputs)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        """sequence: (B, labels); token: (B, T, labels); span: (B, T, 2) start/end logits."""
        inputs = (input_ids, token_type_ids, attention_mask)
        return self.head_outputs(self.head, self.head_kind, self.pooling, self.dropout.p, inputs)


class MultiTaskModel(FrozenAware):
    """One encoder, a head per task (`heads.NAME.*`): forward(..., task=NAME) runs the encoder and that task's head.
    `tasks` maps each name to (head kind, outputs, pooling, dropout before the head)."""

    has_unused_parameters = True  # a batch uses one task's head: DDP must not wait for the others' gradients

    def __init__(self, encoder: nn.Module, tasks: dict[str, tuple[str, int, str, float]], frozen: bool = False):
        super().__init__(encoder, frozen)
        self.tasks = tasks
        self.heads = nn.ModuleDict(
            {name: new_head(encoder.arch.hidden_size, head, n) for name, (head, n, _, _) in tasks.items()}
        )

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, task: str = "") -> torch.Tensor:
        kind, _, pooling, p = self.tasks[task]
        return self.head_outputs(self.heads[task], kind, pooling, p, (input_ids, token_type_ids, attention_mask))


class HeadView:
    """One task's face of a MultiTaskModel (or of its DDP wrapper): called like a single-task model, so a task's
    loss, metrics and predictions work unchanged."""

    def __init__(self, model: nn.Module, task: str):
        self.model, self.task = model, task

    @property
    def training(self) -> bool:
        return self.model.training

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        return self.model(input_ids, token_type_ids, attention_mask, task=self.task)


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
        """(B, T) -> (B, C) sentence vectors, not normalised (a padded batch at a whole length under a CPU's
        autocast, as `FrozenAware.head_outputs` runs it)."""
        inputs = whole_length_inputs(input_ids, token_type_ids, attention_mask, self.encoder.arch.max_positions)
        pooled = pool(self.encoder(*inputs), inputs[2], self.pooling)
        return self.projection(pooled) if self.projection is not None else pooled


HEADS = {"text-cls": "sequence", "pair-cls": "sequence", "token-cls": "token", "qa": "span"}
