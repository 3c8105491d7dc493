"""Architecture schemas, one dataclass per model family; `model.family` picks which one checks the `model`
group. No torch here: the CLI checks configs before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptmcli.fields import described as _f


@dataclass
class BertArch:
    """BERT encoder sizes. The vocabulary size comes from the tokenizer, not from here."""

    family: Literal["bert"] = _f("bert", "model family: picks the model file")
    hidden_size: int = _f(256, "width of every token representation")
    num_layers: int = _f(4, "number of encoder layers")
    num_heads: int = _f(4, "attention heads per layer (must divide hidden_size)")
    intermediate_size: int = _f(1024, "width of the feed-forward inner layer")
    max_positions: int = _f(512, "number of learned position embeddings")
    type_vocab_size: int = _f(2, "number of segment (token type) embeddings")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-12, "LayerNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight initialisation")


@dataclass
class RobertaArch:
    """RoBERTa (Liu et al. 2019): BERT's post-LN encoder without segment embeddings, trained by MLM only."""

    family: Literal["roberta"] = _f("roberta", "model family: picks the model file")
    hidden_size: int = _f(256, "width of every token representation")
    num_layers: int = _f(4, "number of encoder layers")
    num_heads: int = _f(4, "attention heads per layer (must divide hidden_size)")
    intermediate_size: int = _f(1024, "width of the feed-forward inner layer")
    max_positions: int = _f(512, "number of learned position embeddings")
    position_offset: int = _f(0, "position rows before the first position (fairseq's and Hugging Face's: 2)")
    type_vocab_size: int = _f(0, "segment embeddings, added to every token (Hugging Face checkpoints: 1)")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-5, "LayerNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight initialisation")


@dataclass
class GptArch:
    """GPT-2 (Radford et al. 2019): pre-LN causal decoder, learned positions, output tied to the word embeddings."""

    family: Literal["gpt"] = _f("gpt", "model family: picks the model file")
    hidden_size: int = _f(256, "width of every token representation")
    num_layers: int = _f(4, "number of decoder blocks")
    num_heads: int = _f(4, "attention heads per block (must divide hidden_size)")
    intermediate_size: int = _f(1024, "width of the feed-forward inner layer")
    max_positions: int = _f(1024, "number of learned position embeddings (the longest context)")
    activation: Literal["gelu", "gelu-tanh"] = _f("gelu", "feed-forward activation (GPT-2 itself: gelu-tanh)")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-5, "LayerNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight initialisation (residual projections scaled by 1/sqrt(2L))")


@dataclass
class XlnetArch:
    """XLNet (Yang et al. 2019): two-stream self-attention with Transformer-XL relative positions."""

    family: Literal["xlnet"] = _f("xlnet", "model family: picks the model file")
    hidden_size: int = _f(256, "width of every token representation")
    num_layers: int = _f(4, "number of layers")
    num_heads: int = _f(4, "attention heads per layer (must divide hidden_size)")
    intermediate_size: int = _f(1024, "width of the feed-forward inner layer")
    max_positions: int = _f(512, "longest sequence trained on (positions are relative, so this is only a check)")
    segment_encoding: bool = _f(False, "relative segment encoding: whether two tokens share a segment (the paper's)")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-12, "LayerNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight initialisation")


@dataclass
class ElectraArch:
    """ELECTRA (Clark et al. 2020): a small MLM generator and a discriminator sharing the embeddings."""

    family: Literal["electra"] = _f("electra", "model family: picks the model file")
    hidden_size: int = _f(256, "discriminator width")
    num_layers: int = _f(12, "discriminator (and generator) layers")
    num_heads: int = _f(4, "discriminator attention heads (must divide hidden_size)")
    intermediate_size: int = _f(1024, "discriminator feed-forward width")
    embedding_size: int = _f(128, "width of the shared embeddings (projected to each network's width)")
    generator_hidden_size: int = _f(64, "generator width (the paper: 1/4 to 1/2 of the discriminator's)")
    generator_num_heads: int = _f(1, "generator attention heads (must divide generator_hidden_size)")
    generator_intermediate_size: int = _f(256, "generator feed-forward width")
    share_embeddings: bool = _f(
        True, "the generator reads and predicts with the discriminator's embeddings (the paper's); false: its own copy"
    )
    share_all_weights: bool = _f(
        False,
        "the generator is the discriminator itself with an MLM head (the paper's tying of all weights, section 3.2): "
        "its own sizes are not used, and the MLM loss trains the discriminator's layers too",
    )
    max_positions: int = _f(512, "number of learned position embeddings")
    type_vocab_size: int = _f(2, "number of segment (token type) embeddings")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-12, "LayerNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight initialisation")


@dataclass
class T5Arch:
    """T5 (Raffel et al. 2020): pre-norm encoder-decoder, RMS norms, no biases, relative position buckets."""

    family: Literal["t5"] = _f("t5", "model family: picks the model file")
    hidden_size: int = _f(256, "d_model: width of every token representation")
    num_layers: int = _f(4, "encoder layers")
    num_decoder_layers: int = _f(4, "decoder layers")
    num_heads: int = _f(4, "attention heads (must divide hidden_size)")
    intermediate_size: int = _f(1024, "d_ff: width of the feed-forward inner layer")
    feed_forward: Literal["relu", "gated-gelu"] = _f("relu", "feed-forward: T5's ReLU, or T5 v1.1's gated GELU")
    tied_head: bool = _f(True, "output projection tied to the embeddings (T5), or a matrix of its own (T5 v1.1)")
    relative_buckets: int = _f(32, "relative position buckets")
    relative_max_distance: int = _f(128, "distance beyond which all relative positions share a bucket")
    max_positions: int = _f(512, "longest input trained on (positions are relative, so this is only a check)")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-6, "RMS norm epsilon")
    init_std: float = _f(1.0, "initialisation factor (T5's: every matrix N(0, factor/sqrt(fan_in)))")


@dataclass
class BartArch:
    """BART (Lewis et al. 2020): post-LN encoder-decoder with learned positions, a denoising autoencoder."""

    family: Literal["bart"] = _f("bart", "model family: picks the model file")
    hidden_size: int = _f(256, "width of every token representation")
    num_layers: int = _f(4, "encoder layers")
    num_decoder_layers: int = _f(4, "decoder layers")
    num_heads: int = _f(4, "attention heads (must divide hidden_size)")
    intermediate_size: int = _f(1024, "width of the feed-forward inner layer")
    max_positions: int = _f(1024, "number of learned position embeddings (encoder and decoder each)")
    position_offset: int = _f(0, "position rows before the first position (fairseq's and Hugging Face's: 2)")
    dropout: float = _f(0.1, "dropout on embeddings and residual branches")
    attention_dropout: float = _f(0.0, "dropout on attention probabilities")
    layer_norm_eps: float = _f(1e-5, "LayerNorm epsilon")
    init_std: float = _f(0.02, "std of the normal weight initialisation")


# One architecture dataclass per family; `model.family` picks which one checks the `model` group.
MODEL_SCHEMAS: dict[str, type] = {
    "bert": BertArch,
    "roberta": RobertaArch,
    "gpt": GptArch,
    "xlnet": XlnetArch,
    "electra": ElectraArch,
    "t5": T5Arch,
    "bart": BartArch,
}
# Families with a decoder that generates text from an encoded input.
SEQ2SEQ_FAMILIES = ("t5", "bart")


def a_family(family: str) -> str:
    """`family` with its article as said aloud: "an xlnet", "an electra", "a bert", "a t5"."""
    return f"{'an' if family in ('xlnet', 'electra') else 'a'} {family}"


# The pretraining objectives each family's pretraining model is built for.
FAMILY_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "bert": ("mlm", "mlm-nsp", "simcse"),
    "roberta": ("mlm", "simcse"),
    "gpt": ("clm",),
    "xlnet": ("plm", "simcse"),
    "electra": ("rtd", "simcse"),
    "t5": ("span-corruption",),
    "bart": ("denoise",),
}
