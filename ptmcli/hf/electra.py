"""ELECTRA <-> Hugging Face `electra`: config and key maps.

ptm's pretraining model holds the discriminator (`encoder`, what fine-tuning keeps) and a generator that
shares its embeddings; Hugging Face keeps them as two models, `ElectraForPreTraining` and
`ElectraForMaskedLM`. An export writes the discriminator at the top of the directory and the generator in
`generator/`; an import reads `generator/` when it is there.
"""

from __future__ import annotations

from ptmcli.architectures import ElectraArch
from ptmcli.hf.bert import encoder_config, encoder_fields, encoder_rules
from ptmcli.hf.keymap import renamed, rule
from ptmcli.hf.spec import HfFamily, Tokens, UnsupportedConfig

EMBEDDINGS = {"word": "word_embeddings", "position": "position_embeddings", "token_type": "token_type_embeddings"}


def encoder(ours: str, theirs: str, with_projection: bool) -> list:
    return [
        *renamed(f"{ours}embeddings.", f"{theirs}embeddings.", EMBEDDINGS, ("weight",)),
        *renamed(f"{ours}embeddings.", f"{theirs}embeddings.", {"norm": "LayerNorm"}),
        *(renamed(ours, theirs, {"projection": "embeddings_project"}) if with_projection else []),
        *encoder_rules(ours, theirs),
    ]


def rules(arch: ElectraArch, tokens: Tokens) -> list:
    """The discriminator's keys; `generator_rules` gives the generator's (in its own directory)."""
    return [
        *encoder("encoder.", "electra.", arch.embedding_size != arch.hidden_size),
        *renamed("", "discriminator_predictions.", {"rtd_dense": "dense", "rtd_out": "dense_prediction"}),
    ]


def generator_sizes(arch: ElectraArch) -> dict:
    """The generator's width, heads and feed-forward width: the discriminator's when it is the discriminator."""
    if arch.share_all_weights:
        return {
            "hidden_size": arch.hidden_size,
            "num_heads": arch.num_heads,
            "intermediate_size": arch.intermediate_size,
        }
    return {
        "hidden_size": arch.generator_hidden_size,
        "num_heads": arch.generator_num_heads,
        "intermediate_size": arch.generator_intermediate_size,
    }


def generator_rules(arch: ElectraArch, tokens: Tokens) -> list:
    return [
        *encoder("generator.", "electra.", arch.embedding_size != generator_sizes(arch)["hidden_size"]),
        *renamed("mlm_head.", "generator_predictions.", {"dense": "dense", "norm": "LayerNorm"}),
        rule("mlm_head.bias", "generator_lm_head.bias"),
    ]


def arch_from_config(config: dict, generator: dict | None = None) -> ElectraArch:
    for key in ("num_hidden_layers", "embedding_size", "max_position_embeddings", "vocab_size"):
        if generator and generator.get(key) != config.get(key):
            raise UnsupportedConfig(
                f"generator/{key}", generator.get(key), f"ptm's generator shares the discriminator's {config.get(key)}"
            )
    sizes = {}
    if generator:
        fields = encoder_fields(generator, 1e-12)
        sizes = {
            "generator_hidden_size": fields["hidden_size"],
            "generator_num_heads": fields["num_heads"],
            "generator_intermediate_size": fields["intermediate_size"],
        }
    return ElectraArch(
        **encoder_fields(config, 1e-12),
        embedding_size=config.get("embedding_size", config["hidden_size"]),
        max_positions=config["max_position_embeddings"],
        type_vocab_size=config.get("type_vocab_size", 2),
        **sizes,
    )


GENERATOR_CLASS = "ElectraForMaskedLM"


def generator_config(arch: ElectraArch, tokens: Tokens) -> dict:
    return config_from_arch(arch, tokens, generator=True)


def config_from_arch(arch: ElectraArch, tokens: Tokens, generator: bool = False) -> dict:
    config = {
        **encoder_config(arch, tokens),
        "embedding_size": arch.embedding_size,
        "max_position_embeddings": arch.max_positions,
        "type_vocab_size": arch.type_vocab_size,
    }
    if generator:
        sizes = generator_sizes(arch)
        config.update(
            hidden_size=sizes["hidden_size"],
            num_attention_heads=sizes["num_heads"],
            intermediate_size=sizes["intermediate_size"],
        )
    return config


FAMILY = HfFamily(
    family="electra",
    model_type="electra",
    prefix="electra.",
    rules=rules,
    arch_from_config=arch_from_config,
    config_from_arch=config_from_arch,
    pretraining={"rtd": "ElectraForPreTraining"},
    base="ElectraModel",
    heads={
        "token": ("ElectraForTokenClassification", "classifier"),
        "span": ("ElectraForQuestionAnswering", "qa_outputs"),
    },
    ignored=(r"position_ids$", r"generator_lm_head\.weight$"),
)
