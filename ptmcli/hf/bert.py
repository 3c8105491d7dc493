"""BERT <-> Hugging Face `bert` (and BERT-architecture models such as MiniLM): config and key maps."""

from __future__ import annotations

from ptmcli.architectures import BertArch
from ptmcli.hf.keymap import renamed, rule
from ptmcli.hf.spec import HfFamily, Tokens, refuse_unless

ENCODER_LAYER = {
    "attention.out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}


def encoder_rules(ours: str, theirs: str) -> list:
    """A BERT-style encoder (BERT, RoBERTa, ELECTRA share these names) under two prefixes."""
    qkv = [f"{theirs}encoder.layer.{{i}}.attention.self.{p}" for p in ("query", "key", "value")]
    return [
        *renamed(f"{ours}layers.{{i}}.", f"{theirs}encoder.layer.{{i}}.", ENCODER_LAYER),
        rule(f"{ours}layers.{{i}}.attention.qkv.weight", *(f"{k}.weight" for k in qkv)),
        rule(f"{ours}layers.{{i}}.attention.qkv.bias", *(f"{k}.bias" for k in qkv)),
    ]


def rules(arch: BertArch, tokens: Tokens) -> list:
    return [
        *renamed(
            "encoder.embeddings.",
            "bert.embeddings.",
            {"word": "word_embeddings", "position": "position_embeddings", "token_type": "token_type_embeddings"},
            ("weight",),
        ),
        *renamed("encoder.embeddings.", "bert.embeddings.", {"norm": "LayerNorm"}),
        *encoder_rules("encoder.", "bert."),
        *renamed("encoder.", "bert.", {"pooler": "pooler.dense"}),
        *renamed("mlm_head.", "cls.predictions.transform.", {"dense": "dense", "norm": "LayerNorm"}),
        rule("mlm_head.bias", "cls.predictions.bias"),
        *renamed("", "cls.", {"nsp_head": "seq_relationship"}),
    ]


def encoder_fields(config: dict, layer_norm_eps: float) -> dict:
    """The architecture fields a BERT-style config.json (BERT, RoBERTa, ELECTRA) gives, after refusing what ptm's
    post-LN encoder does not implement."""
    refuse_unless(config, "hidden_act", ("gelu",))
    refuse_unless(config, "position_embedding_type", ("absolute",))
    refuse_unless(config, "is_decoder", (False,))
    return {
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "intermediate_size": config["intermediate_size"],
        "dropout": config.get("hidden_dropout_prob", 0.1),
        "attention_dropout": config.get("attention_probs_dropout_prob", 0.1),
        "layer_norm_eps": config.get("layer_norm_eps", layer_norm_eps),
        "init_std": config.get("initializer_range", 0.02),
    }


def encoder_config(arch, tokens: Tokens) -> dict:
    """The config.json fields of a BERT-style encoder (BERT, RoBERTa, ELECTRA)."""
    return {
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.intermediate_size,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": arch.dropout,
        "attention_probs_dropout_prob": arch.attention_dropout,
        "layer_norm_eps": arch.layer_norm_eps,
        "initializer_range": arch.init_std,
        "pad_token_id": tokens.pad,
    }


def arch_from_config(config: dict) -> BertArch:
    return BertArch(
        **encoder_fields(config, 1e-12),
        max_positions=config["max_position_embeddings"],
        type_vocab_size=config.get("type_vocab_size", 2),
    )


def config_from_arch(arch: BertArch, tokens: Tokens) -> dict:
    return {
        **encoder_config(arch, tokens),
        "max_position_embeddings": arch.max_positions,
        "type_vocab_size": arch.type_vocab_size,
    }


FAMILY = HfFamily(
    family="bert",
    model_type="bert",
    prefix="bert.",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"mlm-nsp": "BertForPreTraining", "mlm": "BertForMaskedLM"},
    base="BertModel",
    heads={
        "sequence": ("BertForSequenceClassification", "classifier"),
        "token": ("BertForTokenClassification", "classifier"),
        "span": ("BertForQuestionAnswering", "qa_outputs"),
    },
    ignored=(r"position_ids$", r"cls\.predictions\.decoder\.(weight|bias)$"),
    renames=(("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")),
    pooler=True,
)
