"""BERT (Devlin et al., 2019): post-LayerNorm encoder with word, position and segment embeddings.

`Bert` is the encoder every downstream head sits on; `BertForPretraining` adds the masked-LM head
(tied to the word embeddings) and, optionally, the next-sentence head. Losses live with the objectives.
"""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.architectures import BertArch
from ptmcli.models.dropout import Dropout
from ptmcli.models.layers import MaskedLMHead, init_normal, layer_stack, run_encoder_layers


class Embeddings(nn.Module):
    def __init__(self, arch: BertArch, vocab_size: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, arch.hidden_size)
        self.position = nn.Embedding(arch.max_positions, arch.hidden_size)
        self.token_type = nn.Embedding(arch.type_vocab_size, arch.hidden_size)
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids: (B, T) -> (B, T, C)"""
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:T]
        x = x + (self.token_type(token_type_ids) if token_type_ids is not None else self.token_type.weight[0])
        return self.dropout(self.norm(x))


class Bert(nn.Module):
    """The encoder: (B, T) token ids -> (B, T, C) hidden states; `pool` gives the (B, C) [CLS] summary."""

    def __init__(self, arch: BertArch, vocab_size: int, with_pooler: bool = True):
        super().__init__()
        self.arch = arch
        self.vocab_size = vocab_size
        self.embeddings = Embeddings(arch, vocab_size)
        self.layers = layer_stack(arch)
        self.pooler = nn.Linear(arch.hidden_size, arch.hidden_size) if with_pooler else None

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, token_type_ids, attention_mask (1 = real token): (B, T). Returns (B, T, C), or with `outputs`
        ((B, T) bool) only the states there, (N, C) (`run_encoder_layers`)."""
        x = self.embeddings(input_ids, token_type_ids)
        return run_encoder_layers(self.layers, x, attention_mask, outputs)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C): tanh(dense(first token)), as BERT's pooler."""
        if self.pooler is None:
            raise ValueError("this encoder was built without a pooler")
        return torch.tanh(self.pooler(hidden[:, 0]))


class BertForPretraining(nn.Module):
    """Encoder + masked-LM head (+ next-sentence head when `nsp`)."""

    def __init__(self, arch: BertArch, vocab_size: int, nsp: bool = True):
        super().__init__()
        self.encoder = Bert(arch, vocab_size, with_pooler=nsp)
        self.mlm_head = MaskedLMHead(arch.hidden_size, self.encoder.embeddings.word, arch.layer_norm_eps)
        self.nsp_head = nn.Linear(arch.hidden_size, 2) if nsp else None
        init_normal(self, arch.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        mlm_targets: torch.Tensor | None = None,
        predict: bool = False,
    ) -> dict:
        """mlm_positions: (B, T) bool, the positions to predict. The vocabulary projection runs only there,
        which is most of the speed of a lean MLM step, and so does the last layer after its keys and values
        (`QueryRows`). Returns mlm_logits (N, V), or with `mlm_targets` (N,) their summed cross-entropy as `mlm` (a
        VocabLoss, computed without the logits; argmax with `predict`), and nsp_logits (B, 2)."""
        wanted = mlm_positions
        if wanted is not None and self.nsp_head is not None:  # the next-sentence head reads the first token
            wanted = wanted.clone()
            wanted[:, 0] = True
        states = self.encoder(input_ids, token_type_ids, attention_mask, wanted)  # (N, C), or (B, T, C)
        if wanted is None:
            selected, first = states.flatten(0, 1), states[:, 0]
        else:
            selected = states[mlm_positions[wanted]] if self.nsp_head is not None else states
            per_row = wanted.sum(1)
            first = states[per_row.cumsum(0) - per_row]  # each row's first wanted state: position 0's
        if mlm_targets is None:
            out = {"mlm_logits": self.mlm_head(selected)}
        else:
            out = {"mlm": self.mlm_head.loss(selected, mlm_targets, predict)}
        if self.nsp_head is not None:
            out["nsp_logits"] = self.nsp_head(self.encoder.pool(first[:, None]))
        return out


def build_pretraining(arch: BertArch, vocab_size: int, objective) -> BertForPretraining:
    return BertForPretraining(arch, vocab_size, nsp=objective.name == "mlm-nsp")


def build_encoder(arch: BertArch, vocab_size: int, with_pooler: bool = True) -> Bert:
    encoder = Bert(arch, vocab_size, with_pooler=with_pooler)
    init_normal(encoder, arch.init_std)
    return encoder
