"""RoBERTa <-> Hugging Face `roberta`: config and key maps.

Hugging Face's RoBERTa (as fairseq's) numbers positions from pad_token_id + 1 and keeps one segment row that
is added to every token; ptm's RoBERTa takes both as `position_offset` and `type_vocab_size`, so weights
come and go unchanged. A ptm RoBERTa without them is exported with zero rows in their place.
"""

from __future__ import annotations

import torch

from ptmcli.architectures import RobertaArch
from ptmcli.hf.bert import encoder_config, encoder_fields, encoder_rules
from ptmcli.hf.keymap import renamed, rule
from ptmcli.hf.spec import HfFamily, Tokens


def rules(arch: RobertaArch, tokens: Tokens) -> list:
    missing_rows = tokens.pad + 1 - arch.position_offset  # positions Hugging Face reserves that ptm's lacks

    def save_positions(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.new_zeros(missing_rows, t.shape[1]), t]) if missing_rows > 0 else t

    out = [
        rule("encoder.embeddings.word.weight", "roberta.embeddings.word_embeddings.weight"),
        rule(
            "encoder.embeddings.position.weight",
            "roberta.embeddings.position_embeddings.weight",
            save=save_positions,
        ),
        *renamed("encoder.embeddings.", "roberta.embeddings.", {"norm": "LayerNorm"}),
        *encoder_rules("encoder.", "roberta."),
        *renamed("mlm_head.", "lm_head.", {"dense": "dense", "norm": "layer_norm"}),
        rule("mlm_head.bias", "lm_head.bias"),
    ]
    if arch.type_vocab_size:
        out.append(rule("encoder.embeddings.token_type.weight", "roberta.embeddings.token_type_embeddings.weight"))
    return out


def arch_from_config(config: dict) -> RobertaArch:
    offset = config.get("pad_token_id", 1) + 1
    return RobertaArch(
        **encoder_fields(config, 1e-5),
        max_positions=config["max_position_embeddings"] - offset,
        position_offset=offset,
        type_vocab_size=config.get("type_vocab_size", 1),
    )


def config_from_arch(arch: RobertaArch, tokens: Tokens) -> dict:
    return {
        **encoder_config(arch, tokens),
        "max_position_embeddings": arch.max_positions + max(arch.position_offset, tokens.pad + 1),
        "type_vocab_size": max(arch.type_vocab_size, 1),
        "bos_token_id": tokens.bos,
        "eos_token_id": tokens.eos,
    }


def extras(arch: RobertaArch, tokens: Tokens) -> dict:
    if arch.type_vocab_size:
        return {}
    return {"roberta.embeddings.token_type_embeddings.weight": torch.zeros(1, arch.hidden_size)}


FAMILY = HfFamily(
    family="roberta",
    model_type="roberta",
    prefix="roberta.",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"mlm": "RobertaForMaskedLM"},
    base="RobertaModel",
    heads={
        "token": ("RobertaForTokenClassification", "classifier"),
        "span": ("RobertaForQuestionAnswering", "qa_outputs"),
    },
    ignored=(r"position_ids$", r"lm_head\.decoder\.(weight|bias)$", r"pooler\.dense\.(weight|bias)$"),
    extras=extras,
)
