"""Schemas of the fine-tuning transfer methods (`transfer=`): what trains, and each method's knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptmcli.fields import described as _f


@dataclass
class FullTransfer:
    """Every parameter trains."""

    mode: Literal["full"] = _f("full", "transfer method")
    layer_lr_decay: float = _f(1.0, "lr multiplier per layer below the top (1.0 = off)")


@dataclass
class FrozenTransfer:
    """Feature extraction: the backbone is frozen, only the head trains."""

    mode: Literal["frozen"] = _f("frozen", "transfer method")


@dataclass
class PartialTransfer:
    """Embeddings and the lowest layers are frozen."""

    mode: Literal["partial"] = _f("partial", "transfer method")
    freeze_layers: int = _f(4, "number of lowest encoder layers frozen (embeddings always frozen)")


@dataclass
class LoraTransfer:
    """LoRA (Hu et al. 2021): W + (alpha/r) B A on the target linear layers; B starts at zero."""

    mode: Literal["lora"] = _f("lora", "transfer method")
    r: int = _f(8, "rank of the update")
    alpha: float = _f(16.0, "scale numerator: the update is multiplied by alpha / r")
    dropout: float = _f(0.1, "dropout on the LoRA input")
    targets: list[str] = _f(
        ["qkv", "out", "up", "down"], "linear layers to adapt: query, key, value, qkv, out, up, down"
    )
    bias: Literal["none", "all", "lora_only"] = _f("none", "which biases train too")


@dataclass
class AdaLoraTransfer:
    """AdaLoRA (Zhang et al. 2023): SVD-form updates whose rank budget is reallocated by importance."""

    mode: Literal["adalora"] = _f("adalora", "transfer method")
    init_r: int = _f(12, "initial rank of every update")
    target_r: int = _f(4, "average rank per update once the budget schedule ends")
    alpha: float = _f(32.0, "scale numerator: the update is multiplied by alpha / init_r")
    dropout: float = _f(0.1, "dropout on the update's input")
    targets: list[str] = _f(["query", "value"], "linear layers to adapt: query, key, value, qkv, out, up, down")
    tinit: float = _f(0.1, "fraction of the steps trained at the full initial budget")
    tfinal: float = _f(0.2, "fraction of the final steps trained at the target budget")
    delta_t: int = _f(10, "steps between budget reallocations")
    beta1: float = _f(0.85, "EMA factor of the sensitivity (importance) scores")
    beta2: float = _f(0.85, "EMA factor of the uncertainty of the scores")
    orth_reg_weight: float = _f(0.5, "weight of the orthogonality regulariser on P and Q")


@dataclass
class AdapterTransfer:
    """Houlsby adapters: a residual bottleneck MLP after the attention output and after the feed-forward."""

    mode: Literal["adapter"] = _f("adapter", "transfer method")
    bottleneck: int = _f(64, "width of the adapter bottleneck")


@dataclass
class PrefixTransfer:
    """Prefix tuning (Li & Liang 2021): learned key/value prefixes in every attention layer."""

    mode: Literal["prefix"] = _f("prefix", "transfer method")
    num_virtual_tokens: int = _f(20, "prefix length")
    projection_hidden: int = _f(512, "hidden width of the reparametrisation MLP used during training")
    dropout: float = _f(0.0, "dropout on the prefix states")


@dataclass
class TextToTextTransfer:
    """An encoder-decoder (t5, bart) trained whole to write the answer: for classification, the label word."""

    mode: Literal["text-to-text"] = _f("text-to-text", "transfer method")


TRANSFER_SCHEMAS: dict[str, type] = {
    "full": FullTransfer,
    "frozen": FrozenTransfer,
    "partial": PartialTransfer,
    "lora": LoraTransfer,
    "adalora": AdaLoraTransfer,
    "adapter": AdapterTransfer,
    "prefix": PrefixTransfer,
    "text-to-text": TextToTextTransfer,
}
