"""T5 <-> Hugging Face `t5`: config and key maps, for T5 (ReLU, tied head) and T5 v1.1 (gated GELU, own head).

Hugging Face keeps the relative position bias in each stack's first block; ptm keeps it once per stack.
"""

from __future__ import annotations

from ptmcli.architectures import T5Arch
from ptmcli.hf.keymap import rule
from ptmcli.hf.spec import HfFamily, Tokens, UnsupportedConfig, refuse_unless

FEED_FORWARD = {"relu": "relu", "gated-gelu": "gated-gelu"}


def _attention(ours: str, theirs: str, cross: bool) -> list:
    qkv = [f"{theirs}.{p}.weight" for p in ("q", "k", "v")]
    if cross:
        return [
            rule(f"{ours}.query.weight", qkv[0]),
            rule(f"{ours}.kv.weight", *qkv[1:]),
            rule(f"{ours}.out.weight", f"{theirs}.o.weight"),
        ]
    return [rule(f"{ours}.qkv.weight", *qkv), rule(f"{ours}.out.weight", f"{theirs}.o.weight")]


def _stack(ours: str, theirs: str, index: str, arch: T5Arch, decoder: bool) -> list:
    layer, block = f"{ours}.layers.{{{index}}}", f"{theirs}.block.{{{index}}}.layer"
    ffn = len(("self", "cross") if decoder else ("self",))
    gated = arch.feed_forward == "gated-gelu"
    dense = f"{block}.{ffn}.DenseReluDense"
    out = [
        rule(
            f"{ours}.relative_bias.bias.weight",
            f"{theirs}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        rule(f"{layer}.attention_norm.weight", f"{block}.0.layer_norm.weight"),
        *_attention(f"{layer}.attention", f"{block}.0.SelfAttention", cross=False),
        rule(f"{layer}.ffn_norm.weight", f"{block}.{ffn}.layer_norm.weight"),
        rule(f"{layer}.ffn.up.weight", f"{dense}.wi_1.weight" if gated else f"{dense}.wi.weight"),
        rule(f"{layer}.ffn.down.weight", f"{dense}.wo.weight"),
        rule(f"{ours}.final_norm.weight", f"{theirs}.final_layer_norm.weight"),
    ]
    if gated:
        out.append(rule(f"{layer}.ffn.gate.weight", f"{dense}.wi_0.weight"))
    if decoder:
        out += [
            rule(f"{layer}.cross_norm.weight", f"{block}.1.layer_norm.weight"),
            *_attention(f"{layer}.cross", f"{block}.1.EncDecAttention", cross=True),
        ]
    return out


def rules(arch: T5Arch, tokens: Tokens) -> list:
    return [
        rule("encoder.embeddings.weight", "shared.weight"),
        *_stack("encoder", "encoder", "i", arch, decoder=False),
        *_stack("decoder", "decoder", "j", arch, decoder=True),
        *([] if arch.tied_head else [rule("lm_head.weight", "lm_head.weight")]),
    ]


def arch_from_config(config: dict) -> T5Arch:
    feed_forward = config.get("feed_forward_proj", "relu")
    if feed_forward not in FEED_FORWARD:
        raise UnsupportedConfig("feed_forward_proj", feed_forward, f"ptm implements {', '.join(FEED_FORWARD)}")
    hidden, heads = config["d_model"], config["num_heads"]
    if config.get("d_kv", hidden // heads) * heads != hidden:
        raise UnsupportedConfig(
            "d_kv", config.get("d_kv"), f"ptm's T5 needs d_kv * num_heads = d_model ({hidden} / {heads})"
        )
    refuse_unless(config, "is_encoder_decoder", (True,))
    return T5Arch(
        hidden_size=hidden,
        num_layers=config["num_layers"],
        num_decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
        num_heads=heads,
        intermediate_size=config["d_ff"],
        feed_forward=FEED_FORWARD[feed_forward],
        # transformers 5 writes scale_decoder_outputs; earlier versions said the same with tie_word_embeddings
        tied_head=config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True)),
        relative_buckets=config.get("relative_attention_num_buckets", 32),
        relative_max_distance=config.get("relative_attention_max_distance", 128),
        dropout=config.get("dropout_rate", 0.1),
        attention_dropout=config.get("dropout_rate", 0.1),
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-6),
        init_std=config.get("initializer_factor", 1.0),
    )


def config_from_arch(arch: T5Arch, tokens: Tokens) -> dict:
    return {
        "d_model": arch.hidden_size,
        "d_kv": arch.hidden_size // arch.num_heads,
        "d_ff": arch.intermediate_size,
        "num_layers": arch.num_layers,
        "num_decoder_layers": arch.num_decoder_layers,
        "num_heads": arch.num_heads,
        "relative_attention_num_buckets": arch.relative_buckets,
        "relative_attention_max_distance": arch.relative_max_distance,
        "feed_forward_proj": arch.feed_forward,
        "tie_word_embeddings": arch.tied_head,
        "dropout_rate": arch.dropout,
        "layer_norm_epsilon": arch.layer_norm_eps,
        "initializer_factor": arch.init_std,
        "is_encoder_decoder": True,
        "pad_token_id": tokens.pad,
        "eos_token_id": tokens.eos,
        "decoder_start_token_id": tokens.pad,
    }


def complete(state: dict, arch: T5Arch) -> dict:
    """An unscaled head saved tied to the embeddings (transformers 5 omits it) is a copy of them."""
    if not arch.tied_head and "lm_head.weight" not in state and "shared.weight" in state:
        return {**state, "lm_head.weight": state["shared.weight"]}
    return state


FAMILY = HfFamily(
    family="t5",
    model_type="t5",
    prefix="",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"span-corruption": "T5ForConditionalGeneration"},
    base="T5EncoderModel",
    ignored=(r"^(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$"),
    generates=True,
    complete=complete,
)
