"""RoBERTa (Liu et al., 2019): BERT's post-LayerNorm encoder without segment embeddings, pretrained by
masked LM alone (no next-sentence prediction) with dynamic masking, byte-level BPE and full-length
segments packed across document boundaries; the data side lives in `data/`, this file is the network."""

from __future__ import annotations

import torch
from torch import nn

from ptmcli.architectures import RobertaArch
from ptmcli.models.dropout import Dropout
from ptmcli.models.layers import MaskedLMHead, init_normal, layer_stack, run_encoder_layers


class Embeddings(nn.Module):
    def __init__(self, arch: RobertaArch, vocab_size: int):
        super().__init__()
        self.word = nn.Embedding(vocab_size, arch.hidden_size)
        self.offset = arch.position_offset
        self.position = nn.Embedding(arch.position_offset + arch.max_positions, arch.hidden_size)
        # Hugging Face's RoBERTa keeps one segment row, added to every token
        self.token_type = nn.Embedding(arch.type_vocab_size, arch.hidden_size) if arch.type_vocab_size else None
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> (B, T, C)"""
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[self.offset : self.offset + T]
        if self.token_type is not None:
            x = x + self.token_type.weight[0]
        return self.dropout(self.norm(x))


class Roberta(nn.Module):
    """(B, T) ids -> (B, T, C). Segment ids are accepted and ignored: RoBERTa has no segment embeddings."""

    summary = "first"

    def __init__(self, arch: RobertaArch, vocab_size: int):
        super().__init__()
        self.arch = arch
        self.vocab_size = vocab_size
        self.embeddings = Embeddings(arch, vocab_size)
        self.layers = layer_stack(arch)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, C), or with `outputs` ((B, T) bool) only the states there, (N, C) (`run_encoder_layers`)."""
        x = self.embeddings(input_ids)
        return run_encoder_layers(self.layers, x, attention_mask, outputs)


class RobertaForMaskedLM(nn.Module):
    def __init__(self, arch: RobertaArch, vocab_size: int):
        super().__init__()
        self.encoder = Roberta(arch, vocab_size)
        self.mlm_head = MaskedLMHead(arch.hidden_size, self.encoder.embeddings.word, arch.layer_norm_eps)
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
        """Returns mlm_logits (N, V) at `mlm_positions` (B, T) bool, or at every position; with `mlm_targets` (N,)
        their summed cross-entropy as `mlm` instead (a VocabLoss, as BertForPretraining)."""
        selected = self.encoder(input_ids, None, attention_mask, mlm_positions).flatten(0, -2)  # (N, C)
        if mlm_targets is None:
            return {"mlm_logits": self.mlm_head(selected)}
        return {"mlm": self.mlm_head.loss(selected, mlm_targets, predict)}


def build_pretraining(arch: RobertaArch, vocab_size: int, objective) -> RobertaForMaskedLM:
    return RobertaForMaskedLM(arch, vocab_size)


def build_encoder(arch: RobertaArch, vocab_size: int) -> Roberta:
    encoder = Roberta(arch, vocab_size)
    init_normal(encoder, arch.init_std)
    return encoder
