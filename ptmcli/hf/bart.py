"""BART <-> Hugging Face `bart`: config and key maps.

Hugging Face's BART (as fairseq's) keeps two position rows before the first position; ptm's BART takes them
as `position_offset`, and one without them is exported with zero rows in their place.
"""

from __future__ import annotations

import torch

from ptmcli.architectures import BartArch
from ptmcli.hf.keymap import renamed, rule
from ptmcli.hf.spec import HfFamily, Tokens, UnsupportedConfig, refuse_unless

OFFSET = 2  # BartLearnedPositionalEmbedding's


def _attention(ours: str, theirs: str, cross: bool) -> list:
    names = [f"{theirs}.{p}_proj" for p in ("q", "k", "v")]
    fused = {"query": names[:1], "kv": names[1:]} if cross else {"qkv": names}
    return [
        *(
            rule(f"{ours}.{f}.{s}", *(f"{n}.{s}" for n in parts))
            for f, parts in fused.items()
            for s in ("weight", "bias")
        ),
        *renamed(f"{ours}.", f"{theirs}.", {"out": "out_proj"}),
    ]


def rules(arch: BartArch, tokens: Tokens) -> list:
    missing_rows = OFFSET - arch.position_offset

    def save_positions(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.new_zeros(missing_rows, t.shape[1]), t]) if missing_rows > 0 else t

    enc, dec = "model.encoder.layers.{i}", "model.decoder.layers.{j}"
    layer_norms = {
        "attention_norm": "self_attn_layer_norm",
        "ffn.up": "fc1",
        "ffn.down": "fc2",
        "ffn_norm": "final_layer_norm",
    }
    return [
        rule("encoder.embeddings.word.weight", "model.shared.weight"),
        rule("encoder.embeddings.position.weight", "model.encoder.embed_positions.weight", save=save_positions),
        *renamed("encoder.embeddings.", "model.encoder.", {"norm": "layernorm_embedding"}),
        *renamed("encoder.layers.{i}.", f"{enc}.", layer_norms),
        *_attention("encoder.layers.{i}.attention", f"{enc}.self_attn", cross=False),
        rule("decoder.position.weight", "model.decoder.embed_positions.weight", save=save_positions),
        *renamed("decoder.", "model.decoder.", {"norm": "layernorm_embedding"}),
        *renamed("decoder.layers.{j}.", f"{dec}.", {**layer_norms, "cross_norm": "encoder_attn_layer_norm"}),
        *_attention("decoder.layers.{j}.attention", f"{dec}.self_attn", cross=False),
        *_attention("decoder.layers.{j}.cross", f"{dec}.encoder_attn", cross=True),
        rule("lm_bias", "final_logits_bias", load=lambda t: t.reshape(-1), save=lambda t: t.reshape(1, -1)),
    ]


def arch_from_config(config: dict) -> BartArch:
    refuse_unless(config, "activation_function", ("gelu",))
    for key in ("scale_embedding", "normalize_before", "add_final_layer_norm", "normalize_embedding"):
        refuse_unless(config, key, (True,) if key == "normalize_embedding" else (False,))
    for ours, (enc, dec) in {
        "heads": ("encoder_attention_heads", "decoder_attention_heads"),
        "ffn": ("encoder_ffn_dim", "decoder_ffn_dim"),
    }.items():
        if config[enc] != config[dec]:
            raise UnsupportedConfig(dec, config[dec], f"ptm's BART needs the same {ours} as {enc}={config[enc]}")
    return BartArch(
        hidden_size=config["d_model"],
        num_layers=config["encoder_layers"],
        num_decoder_layers=config["decoder_layers"],
        num_heads=config["encoder_attention_heads"],
        intermediate_size=config["encoder_ffn_dim"],
        max_positions=config["max_position_embeddings"],
        position_offset=OFFSET,
        dropout=config.get("dropout", 0.1),
        attention_dropout=config.get("attention_dropout", 0.0),
        init_std=config.get("init_std", 0.02),
    )


def config_from_arch(arch: BartArch, tokens: Tokens) -> dict:
    if arch.layer_norm_eps != 1e-5:
        raise UnsupportedConfig("model.layer_norm_eps", arch.layer_norm_eps, "Hugging Face's BART fixes it at 1e-05")
    return {
        "d_model": arch.hidden_size,
        "encoder_layers": arch.num_layers,
        "decoder_layers": arch.num_decoder_layers,
        "encoder_attention_heads": arch.num_heads,
        "decoder_attention_heads": arch.num_heads,
        "encoder_ffn_dim": arch.intermediate_size,
        "decoder_ffn_dim": arch.intermediate_size,
        "max_position_embeddings": arch.max_positions,
        "activation_function": "gelu",
        "dropout": arch.dropout,
        "attention_dropout": arch.attention_dropout,
        "activation_dropout": 0.0,
        "init_std": arch.init_std,
        "scale_embedding": False,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "pad_token_id": tokens.pad,
        "bos_token_id": tokens.bos,
        "eos_token_id": tokens.eos,
        "decoder_start_token_id": tokens.eos,
        "forced_eos_token_id": tokens.eos,
    }


FAMILY = HfFamily(
    family="bart",
    model_type="bart",
    prefix="model.",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"denoise": "BartForConditionalGeneration"},
    base=None,
    ignored=(r"^model\.(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$"),
    generates=True,
)
