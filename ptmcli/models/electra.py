"""ELECTRA (Clark et al., 2020): replaced-token detection.

A small masked-LM generator fills the masked positions with samples; the discriminator (the model that is
kept and fine-tuned) predicts for every token whether it was replaced. Both networks share the token,
position and segment embeddings (unless `model.share_embeddings=false`), which have their own width and are
projected to each network's width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.architectures import ElectraArch
from ptmcli.models.dropout import Dropout
from ptmcli.models.layers import EncoderLayer, MaskedLMHead, init_normal, run_encoder_layers
from ptmcli.models.vocab_loss import IGNORE, in_cpu_autocast


class Embeddings(nn.Module):
    def __init__(self, arch: ElectraArch, vocab_size: int):
        super().__init__()
        width = arch.embedding_size
        self.word = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(arch.max_positions, width)
        self.token_type = nn.Embedding(arch.type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=arch.layer_norm_eps)
        self.dropout = Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word(input_ids) + self.position.weight[: input_ids.shape[1]]
        x = x + (self.token_type(token_type_ids) if token_type_ids is not None else self.token_type.weight[0])
        return self.dropout(self.norm(x))


class Electra(nn.Module):
    """A post-LN encoder over (possibly shared) embeddings: the discriminator, or with generator sizes the
    generator. (B, T) ids -> (B, T, hidden)."""

    summary = "first"

    def __init__(self, arch: ElectraArch, vocab_size: int, generator: bool = False, embeddings=None):
        super().__init__()
        hidden = arch.generator_hidden_size if generator else arch.hidden_size
        heads = arch.generator_num_heads if generator else arch.num_heads
        intermediate = arch.generator_intermediate_size if generator else arch.intermediate_size
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden
        self.embeddings = embeddings if embeddings is not None else Embeddings(arch, vocab_size)
        self.projection = nn.Linear(arch.embedding_size, hidden) if arch.embedding_size != hidden else None
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, heads, intermediate, arch.dropout, arch.attention_dropout, arch.layer_norm_eps)
            for _ in range(arch.num_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, hidden), or with `outputs` ((B, T) bool) only the states there, (N, hidden)."""
        x = self.embeddings(input_ids, token_type_ids)
        if self.projection is not None:
            x = self.projection(x)
        return run_encoder_layers(self.layers, x, attention_mask, outputs)


class ElectraForPretraining(nn.Module):
    """`encoder` is the discriminator (what fine-tuning loads); `generator` shares its embeddings unless
    `arch.share_embeddings` is false, and is the discriminator itself with `arch.share_all_weights`.

    `replaced_prior` is the expected share of replaced tokens (the masking rate): the discriminator's output bias
    starts at its log-odds. From a zero bias, the first updates of every token's logit all point one way ("fewer
    replaced"), and Adam moves every weight matrix at full step along it at once: the discriminator collapses to
    one state for all tokens (mean cosine 0.98 between token states after 250 steps, measured) and stays at the
    all-original baseline. Calibrated, the same run keeps distinct token states and learns to detect."""

    def __init__(
        self, arch: ElectraArch, vocab_size: int, replaced_prior: float | None = None, sampling_temperature: float = 1.0
    ):
        super().__init__()
        self.sampling_temperature = sampling_temperature
        self.encoder = Electra(arch, vocab_size)
        if arch.share_all_weights:
            self.generator = self.encoder
        else:
            shared = self.encoder.embeddings if arch.share_embeddings else None
            self.generator = Electra(arch, vocab_size, generator=True, embeddings=shared)
        self.mlm_head = MaskedLMHead(self.generator.hidden_size, self.generator.embeddings.word, arch.layer_norm_eps)
        self.rtd_dense = nn.Linear(arch.hidden_size, arch.hidden_size)
        self.rtd_out = nn.Linear(arch.hidden_size, 1)
        init_normal(self, arch.init_std)
        if replaced_prior is not None and 0 < replaced_prior < 1:
            nn.init.constant_(self.rtd_out.bias, math.log(replaced_prior / (1 - replaced_prior)))

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        mlm_positions: torch.Tensor,
        mlm_targets: torch.Tensor,
        predict: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The generator's summed masked-LM loss (`mlm_predicted`: its argmax at each of `mlm_positions`, with
        `predict`); the discriminator's replaced-token logits (B, T) on the input with the masked positions filled
        by generator samples; and which tokens were replaced (B, T). A position whose target is IGNORE is predicted
        (for whole buckets of rows) but not masked: it keeps its token.

        One forward does both, so data-parallel training syncs the gradients of both networks. The generator's
        logits are taken a chunk of positions at a time, with the samples drawn from each chunk's softmax (they
        are not differentiated: the generator is trained by its MLM loss only)."""
        generator_states = self.generator(input_ids, token_type_ids, attention_mask, mlm_positions)
        generated = self.mlm_head.loss(generator_states, mlm_targets, predict, sample=self.sampling_temperature)
        sampled, masked = generated.sampled, mlm_positions
        # rows added to whole buckets, under a CPU's autocast only (objectives/mlm.positions_to_predict; on a GPU the
        # test would be a host sync)
        if in_cpu_autocast(mlm_targets) and (mlm_targets == IGNORE).any():
            kept = mlm_targets != IGNORE
            masked = mlm_positions.clone()
            masked[mlm_positions] = kept
            sampled, mlm_targets = sampled[kept], mlm_targets[kept]
        original = input_ids.clone()
        original[masked] = mlm_targets
        corrupted = original.clone()
        corrupted[masked] = sampled
        hidden = self.encoder(corrupted, token_type_ids, attention_mask)
        rtd_logits = self.rtd_out(F.gelu(self.rtd_dense(hidden))).squeeze(-1)
        return {
            "mlm_loss": generated.loss,
            "mlm_predicted": generated.predicted,
            "rtd_logits": rtd_logits,
            "replaced": corrupted != original,
        }


def build_pretraining(arch: ElectraArch, vocab_size: int, objective) -> ElectraForPretraining:
    return ElectraForPretraining(
        arch,
        vocab_size,
        replaced_prior=getattr(objective, "mask_prob", None),
        sampling_temperature=getattr(objective, "sampling_temperature", 1.0),
    )


def build_encoder(arch: ElectraArch, vocab_size: int) -> Electra:
    encoder = Electra(arch, vocab_size)
    init_normal(encoder, arch.init_std)
    return encoder
