"""What each family's interop module declares: `HfFamily`, plus the checks its config map uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class UnsupportedConfig(ValueError):
    """A config.json field whose value ptm's model does not implement; the caller names the file."""

    def __init__(self, key: str, value: Any, supported: str):
        super().__init__(f"{key}={value!r} ({supported})")


def refuse_unless(config: dict, key: str, allowed: tuple, default: Any = None) -> Any:
    """config[key] (or `default`, else the first allowed value, when absent), refused unless allowed."""
    value = config.get(key, allowed[0] if default is None else default)
    if value not in allowed:
        raise UnsupportedConfig(key, value, f"ptm implements {' or '.join(repr(a) for a in allowed)}")
    return value


@dataclass(frozen=True)
class Tokens:
    """The ids a config.json records, read off the tokenizer."""

    pad: int
    bos: int
    eos: int
    unk: int
    vocab_size: int


@dataclass(frozen=True)
class HfFamily:
    family: str  # ptm's family
    model_type: str  # Hugging Face's `model_type`
    prefix: str  # where the base model sits in the Hugging Face task and pretraining classes
    rules: Callable  # (arch, Tokens) -> [Rule] between ptm's pretraining model and the pretraining class
    arch_from_config: Callable  # config.json -> architecture dataclass (raises UnsupportedConfig)
    config_from_arch: Callable  # (arch, Tokens) -> config.json fields
    pretraining: dict[str, str]  # ptm objective -> Hugging Face class of the pretraining model
    base: str | None  # the class of the bare encoder (export of a head with no Hugging Face equivalent)
    heads: dict[str, tuple[str, str]] = field(default_factory=dict)  # ptm head kind -> (class, head module)
    ignored: tuple[str, ...] = ()  # Hugging Face keys that are buffers or tied copies
    renames: tuple[tuple[str, str], ...] = ()  # old spellings of Hugging Face names
    pooler: bool = False  # the encoder has BERT's pooler (sequence heads sit on it)
    generates: bool = False  # a generation_config.json belongs in an export
    extras: Callable = lambda arch, tokens: {}  # Hugging Face tensors ptm's model lacks, as exported (zeros)
    complete: Callable = lambda state, arch: state  # fill in tensors a checkpoint leaves to tying on load
    layer_counts: Callable = lambda arch: {"i": arch.num_layers, "j": getattr(arch, "num_decoder_layers", 0)}
