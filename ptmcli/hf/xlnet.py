"""XLNet <-> Hugging Face `xlnet`: config and key maps. Hugging Face stores each projection as
(hidden, heads, head size) and the biases u, v, s and the segment embeddings per layer."""

from __future__ import annotations

import torch

from ptmcli.architectures import XlnetArch
from ptmcli.hf.keymap import renamed, rule
from ptmcli.hf.spec import HfFamily, Tokens, refuse_unless


def rules(arch: XlnetArch, tokens: Tokens) -> list:
    C, nh = arch.hidden_size, arch.num_heads

    def into(t: torch.Tensor) -> torch.Tensor:  # (C, nh, hs) read as x @ W -> our (nh*hs, C) Linear weight
        return t.reshape(C, -1).t()

    def outof(t: torch.Tensor) -> torch.Tensor:
        return t.t().reshape(C, nh, -1)

    ours, theirs = "encoder.layers.{i}.", "transformer.layer.{i}."
    attn = f"{theirs}rel_attn."
    out = [
        rule("encoder.embeddings.word.weight", "transformer.word_embedding.weight"),
        rule(
            "encoder.embeddings.query",
            "transformer.mask_emb",
            load=lambda t: t.reshape(-1),
            save=lambda t: t.reshape(1, 1, -1),
        ),
        rule(f"{ours}attention.qkv.weight", *(f"{attn}{p}" for p in "qkv"), load=into, save=outof),
        rule(f"{ours}attention.position.weight", f"{attn}r", load=into, save=outof),
        rule(
            f"{ours}attention.out.weight",
            f"{attn}o",
            load=lambda t: t.reshape(C, -1),
            save=lambda t: t.reshape(C, nh, -1),
        ),
        rule(f"{ours}attention.content_bias", f"{attn}r_w_bias"),
        rule(f"{ours}attention.position_bias", f"{attn}r_r_bias"),
        *renamed(ours, attn, {"attention_norm": "layer_norm"}),
        *renamed(ours, f"{theirs}ff.", {"ffn.up": "layer_1", "ffn.down": "layer_2", "ffn_norm": "layer_norm"}),
        rule("lm_bias", "lm_loss.bias"),
    ]
    if arch.segment_encoding:
        out += [
            rule(f"{ours}attention.segment_bias", f"{attn}r_s_bias"),
            rule(f"{ours}attention.segment_embed", f"{attn}seg_embed"),
        ]
    return out


def extras(arch: XlnetArch, tokens: Tokens) -> dict:
    """A ptm XLNet without segment encoding exports zero segment terms: the same scores."""
    if arch.segment_encoding:
        return {}
    head = (arch.num_heads, arch.hidden_size // arch.num_heads)
    out = {}
    for i in range(arch.num_layers):
        out[f"transformer.layer.{i}.rel_attn.r_s_bias"] = torch.zeros(head)
        out[f"transformer.layer.{i}.rel_attn.seg_embed"] = torch.zeros(2, *head)
    return out


def arch_from_config(config: dict) -> XlnetArch:
    refuse_unless(config, "ff_activation", ("gelu",))
    refuse_unless(config, "attn_type", ("bi",))
    refuse_unless(config, "untie_r", (True,))
    refuse_unless(config, "bi_data", (False,))
    refuse_unless(config, "same_length", (False,))
    if config.get("clamp_len", -1) > 0:
        refuse_unless(config, "clamp_len", (-1,))
    return XlnetArch(
        hidden_size=config["d_model"],
        num_layers=config["n_layer"],
        num_heads=config["n_head"],
        intermediate_size=config["d_inner"],
        segment_encoding=True,
        dropout=config.get("dropout", 0.1),
        attention_dropout=config.get("dropout", 0.1),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        init_std=config.get("initializer_range", 0.02),
    )


def config_from_arch(arch: XlnetArch, tokens: Tokens) -> dict:
    return {
        "d_model": arch.hidden_size,
        "n_layer": arch.num_layers,
        "n_head": arch.num_heads,
        "d_head": arch.hidden_size // arch.num_heads,
        "d_inner": arch.intermediate_size,
        "ff_activation": "gelu",
        "untie_r": True,
        "attn_type": "bi",
        "bi_data": False,
        "clamp_len": -1,
        "same_length": False,
        "mem_len": None,
        "reuse_len": None,
        "dropout": arch.dropout,
        "layer_norm_eps": arch.layer_norm_eps,
        "initializer_range": arch.init_std,
        "pad_token_id": tokens.pad,
        "bos_token_id": tokens.bos,
        "eos_token_id": tokens.eos,
    }


FAMILY = HfFamily(
    family="xlnet",
    model_type="xlnet",
    prefix="transformer.",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"plm": "XLNetLMHeadModel"},
    base="XLNetModel",
    heads={
        "token": ("XLNetForTokenClassification", "classifier"),
        "span": ("XLNetForQuestionAnsweringSimple", "qa_outputs"),
    },
    ignored=(r"^lm_loss\.weight$",),
    extras=extras,
    generates=False,
)
