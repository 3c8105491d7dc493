"""GPT <-> Hugging Face `gpt2`: config and key maps. GPT-2's Conv1D layers store weights as (in, out)."""

from __future__ import annotations

from ptmcli.architectures import GptArch
from ptmcli.hf.keymap import renamed, rule, transposed
from ptmcli.hf.spec import HfFamily, Tokens, UnsupportedConfig, refuse_unless

ACTIVATIONS = {"gelu_new": "gelu-tanh", "gelu_pytorch_tanh": "gelu-tanh", "gelu": "gelu"}
CONV1D = {
    "attention.qkv": "attn.c_attn",
    "attention.out": "attn.c_proj",
    "ffn.up": "mlp.c_fc",
    "ffn.down": "mlp.c_proj",
}


def rules(arch: GptArch, tokens: Tokens) -> list:
    layer, theirs = "encoder.layers.{i}.", "transformer.h.{i}."
    return [
        rule("encoder.embeddings.word.weight", "transformer.wte.weight"),
        rule("encoder.embeddings.position.weight", "transformer.wpe.weight"),
        *renamed(layer, theirs, {"attention_norm": "ln_1", "ffn_norm": "ln_2"}),
        *(transposed(f"{layer}{ours}.weight", f"{theirs}{conv}.weight") for ours, conv in CONV1D.items()),
        *(rule(f"{layer}{ours}.bias", f"{theirs}{conv}.bias") for ours, conv in CONV1D.items()),
        *renamed("encoder.", "transformer.", {"final_norm": "ln_f"}),
    ]


def arch_from_config(config: dict) -> GptArch:
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise UnsupportedConfig("activation_function", activation, f"ptm implements {', '.join(ACTIVATIONS)}")
    refuse_unless(config, "scale_attn_weights", (True,))
    refuse_unless(config, "scale_attn_by_inverse_layer_idx", (False,))
    refuse_unless(config, "add_cross_attention", (False,))
    refuse_unless(config, "tie_word_embeddings", (True,))
    hidden = config["n_embd"]
    return GptArch(
        hidden_size=hidden,
        num_layers=config["n_layer"],
        num_heads=config["n_head"],
        intermediate_size=config.get("n_inner") or 4 * hidden,
        max_positions=config["n_positions"],
        activation=ACTIVATIONS[activation],
        dropout=config.get("resid_pdrop", 0.1),
        attention_dropout=config.get("attn_pdrop", 0.1),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        init_std=config.get("initializer_range", 0.02),
    )


def config_from_arch(arch: GptArch, tokens: Tokens) -> dict:
    return {
        "n_embd": arch.hidden_size,
        "n_layer": arch.num_layers,
        "n_head": arch.num_heads,
        "n_inner": arch.intermediate_size,
        "n_positions": arch.max_positions,
        "activation_function": "gelu_new" if arch.activation == "gelu-tanh" else "gelu",
        "resid_pdrop": arch.dropout,
        "embd_pdrop": arch.dropout,
        "attn_pdrop": arch.attention_dropout,
        "layer_norm_epsilon": arch.layer_norm_eps,
        "initializer_range": arch.init_std,
        "bos_token_id": tokens.bos,
        "eos_token_id": tokens.eos,
        "pad_token_id": tokens.pad,
        "tie_word_embeddings": True,
    }


FAMILY = HfFamily(
    family="gpt",
    model_type="gpt2",
    prefix="transformer.",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"clm": "GPT2LMHeadModel"},
    base="GPT2Model",
    heads={
        "token": ("GPT2ForTokenClassification", "classifier"),
        "span": ("GPT2ForQuestionAnswering", "qa_outputs"),
    },
    ignored=(r"attn\.(masked_)?bias$", r"^lm_head\.weight$"),
    generates=True,
)
