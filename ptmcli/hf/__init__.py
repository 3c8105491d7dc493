"""Hugging Face checkpoints in and out, for every family: `read_dir` turns a model directory into ptm's
architecture, state dict and tokenizer; `hf_state` and `write_dir` do the reverse. The names live in one small
module per family (`hf/bert.py`, `hf/gpt2.py`, ...), used both ways.

Weights are read with safetensors, or with `torch.load(weights_only=True)` for `pytorch_model.bin`: reading a
directory never runs code from it.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from ptmcli.architectures import a_family
from ptmcli.data.tokenizer import SpecialIds, load_tokenizer
from ptmcli.errors import PtmError
from ptmcli.hf import bart, bert, electra, gpt2, roberta, t5, xlnet
from ptmcli.hf.keymap import covered, to_ours, to_theirs
from ptmcli.hf.spec import HfFamily, Tokens, UnsupportedConfig

BY_MODEL_TYPE: dict[str, HfFamily] = {
    m.FAMILY.model_type: m.FAMILY for m in (bert, roberta, gpt2, xlnet, electra, t5, bart)
}
BY_FAMILY: dict[str, HfFamily] = {f.family: f for f in BY_MODEL_TYPE.values()}
# Architectures that are BERT under another name
ALIASES = {"minilm": "bert"}
BYTE_BPE_SPECIALS = ("<s>", "</s>", "<pad>", "<unk>", "<mask>", "<|endoftext|>")


@dataclass
class Imported:
    family: str
    arch: Any
    state: dict[str, torch.Tensor]  # ptm's names, as in the family's pretraining model
    tokenizer: Tokenizer
    unused: list[str] = field(default_factory=list)  # Hugging Face keys that ptm does not take (task heads)


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PtmError(f"{what}: '{path}' could not be read as JSON ({err}).") from err
    if not isinstance(value, dict):
        raise PtmError(f"{what}: '{path}' holds a JSON {type(value).__name__}, not an object.")
    return value


def _load_bin(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PtmError(
            f"{what}: '{path}' is a pickle that holds more than tensors, and ptm does not unpickle code from a "
            f"model file. Convert it to model.safetensors where you trust it (for example "
            f"`model.save_pretrained(dir, safe_serialization=True)` in transformers)."
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise PtmError(f"{what}: '{path}' could not be read as PyTorch weights ({err}).") from err


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise PtmError(f"{what}: '{path}' is damaged or not a safetensors file ({err}).") from err


def read_weights(path: Path, what: str = "init") -> dict[str, torch.Tensor]:
    """A directory's weights: model.safetensors, a sharded index of them, or pytorch_model.bin (also sharded)."""
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)):
        if (path / name).exists():
            return loader(path / name, what)
        index = path / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(_read_json(index, what).get("weight_map", {}).values()))
            if not shards or any("/" in s or "\\" in s for s in shards):
                raise PtmError(f"{what}: '{index}' has no weight_map naming shard files beside it.")
            state = {}
            for shard in shards:
                if not (path / shard).exists():
                    raise PtmError(f"{what}: '{index}' names the shard '{shard}', which is not in '{path}'.")
                state.update(loader(path / shard, what))
            return state
    raise PtmError(
        f"{what}: '{path}' has a config.json but no weights: expected model.safetensors, "
        f"model.safetensors.index.json with its shards, or pytorch_model.bin."
    )


def read_tokenizer(path: Path, model_type: str, what: str = "init") -> Tokenizer:
    """The directory's tokenizer, giving the ids `AutoTokenizer.from_pretrained(path)` gives."""
    settings = _read_json(path / "tokenizer_config.json", what) if (path / "tokenizer_config.json").exists() else {}
    if (path / "tokenizer.json").exists():
        return load_tokenizer(str(path / "tokenizer.json"))
    if (path / "vocab.txt").exists():
        return load_tokenizer(str(path / "vocab.txt"), settings.get("do_lower_case", True))
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        return _byte_bpe(path, model_type, settings)
    if (path / "spiece.model").exists() or (path / "sentencepiece.bpe.model").exists():
        raise PtmError(
            f"{what}: '{path}' has only a SentencePiece model, which ptm reads through a tokenizer.json. Write one "
            f'where transformers is installed: python -c "from transformers import AutoTokenizer; '
            f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')\"."
        )
    raise PtmError(
        f"{what}: '{path}' has no tokenizer: expected tokenizer.json, vocab.txt (WordPiece) or vocab.json + "
        f"merges.txt (byte-level BPE)."
    )


def _byte_bpe(path: Path, model_type: str, settings: dict) -> Tokenizer:
    """GPT-2 / RoBERTa / BART files: byte-level BPE; RoBERTa and BART wrap texts in <s> ... </s>."""
    tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings.get("add_prefix_space", False))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in BYTE_BPE_SPECIALS if tok.token_to_id(t) is not None])
    if model_type in ("roberta", "bart"):
        bos, eos = ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[bos, eos]
        )
    return tok


def family_of(config: dict, path: Path, what: str) -> HfFamily:
    model_type = ALIASES.get(config.get("model_type", ""), config.get("model_type"))
    if model_type not in BY_MODEL_TYPE:
        raise PtmError(
            f"{what}: '{path}' holds a Hugging Face '{model_type}' model; ptm maps {', '.join(BY_MODEL_TYPE)} onto "
            f"its families ({', '.join(BY_FAMILY)}). Pick a checkpoint of one of those types."
        )
    return BY_MODEL_TYPE[model_type]


def _with_prefix(state: dict[str, torch.Tensor], family: HfFamily) -> dict[str, torch.Tensor]:
    """A base model (BertModel, GPT2Model, ...) saves its keys without the prefix the task classes use."""
    for old, new in family.renames:
        state = {k.replace(old, new): v for k, v in state.items()}
    if family.prefix and not any(k.startswith(family.prefix) for k in state):
        state = {family.prefix + k: v for k, v in state.items()}
    return state


def read_arch(path: Path, what: str = "init") -> tuple[HfFamily, Any, dict | None]:
    """(family, ptm architecture, ELECTRA generator's config.json) of a directory, from its config.json (and, for
    an ELECTRA directory with a generator/, whether the two share their word embeddings or all weights, from the
    weights)."""
    family, arch, generator = _arch_from_configs(path, what)
    if generator:
        weights = (_with_prefix(read_weights(d, what), family) for d in (path, path / "generator"))
        arch = _with_generator_sharing(arch, family, *weights)
    return family, arch, generator


def _arch_from_configs(path: Path, what: str) -> tuple[HfFamily, Any, dict | None]:
    config = _read_json(path / "config.json", what)
    family = family_of(config, path, what)
    generator_dir = path / "generator"
    generator = (
        _read_json(generator_dir / "config.json", what)
        if family.family == "electra" and (generator_dir / "config.json").exists()
        else None
    )
    try:
        arch = family.arch_from_config(config, generator) if generator else family.arch_from_config(config)
    except UnsupportedConfig as err:
        raise PtmError(
            f"{what}: '{path / 'config.json'}' has {err}, which ptm's {family.family} model does not implement, "
            f"so its outputs would differ from the checkpoint's. Pick a checkpoint without it."
        ) from err
    except (KeyError, TypeError) as err:
        raise PtmError(
            f"{what}: '{path / 'config.json'}' lacks {err} for {a_family(family.model_type)} model."
        ) from err
    return family, arch, generator


def _with_generator_sharing(arch, family: HfFamily, weights: dict, generator_weights: dict):
    """An ELECTRA generator holds the discriminator's word embeddings (trained shared, as the paper's) or a matrix
    of its own (ptm's `model.share_embeddings=false`); one whose every encoder weight equals the discriminator's was
    the discriminator itself (`model.share_all_weights=true`)."""

    def same(key: str) -> bool:
        ours, theirs = weights.get(key), generator_weights.get(key)
        return ours is None or theirs is None or (ours.shape == theirs.shape and torch.equal(ours, theirs))

    if not same(f"{family.prefix}embeddings.word_embeddings.weight"):
        return dataclasses.replace(arch, share_embeddings=False)
    layers = (f"{family.prefix}encoder.", f"{family.prefix}embeddings_project.")
    encoder = [k for k in generator_weights if k.startswith(layers)]
    if encoder and all(k in weights and same(k) for k in encoder):
        return dataclasses.replace(arch, share_all_weights=True)
    return arch


def _fill_vocabulary(tokenizer: Tokenizer, rows: int, path: Path, what: str) -> Tokenizer:
    """Checkpoints may pad their embedding matrix past the tokenizer (T5: 32,128 rows for 32,100 tokens); the
    tokenizer gets as many unused tokens, so that ids and rows agree everywhere in ptm."""
    size = tokenizer.get_vocab_size()
    if rows < size:
        raise PtmError(f"{what}: '{path}' has {rows:,} embedding rows for a tokenizer of {size:,} tokens.")
    if rows > size:
        tokenizer.add_special_tokens([f"<ptm_unused_{i}>" for i in range(rows - size)])
    return tokenizer


def read_dir(path: Path, what: str = "init") -> Imported:
    family, arch, generator = _arch_from_configs(path, what)
    tokenizer = read_tokenizer(path, family.model_type, what)
    tokens = tokens_of(tokenizer)
    counts = family.layer_counts(arch)
    weights = family.complete(_with_prefix(read_weights(path, what), family), arch)
    if generator:
        generator_weights = _with_prefix(read_weights(path / "generator", what), family)
        arch = _with_generator_sharing(arch, family, weights, generator_weights)
    word = next(
        (r for r in family.rules(arch, tokens) if r.ours.endswith(("embeddings.word.weight", "embeddings.weight")))
    )
    if word.theirs[0] in weights:
        tokenizer = _fill_vocabulary(tokenizer, weights[word.theirs[0]].shape[0], path, what)
        tokens = tokens_of(tokenizer)
    state, unused = to_ours(weights, family.rules(arch, tokens), counts)
    if generator:
        gen_state, gen_unused = to_ours(generator_weights, electra.generator_rules(arch, tokens), counts)
        # a generator trained with shared embeddings (as ELECTRA's) reads the discriminator's; a shared one whose
        # copy of the position or segment embeddings differs is named among the keys not taken
        tied = "generator." if arch.share_all_weights else "generator.embeddings."
        shared = {k for k in gen_state if k.startswith(tied) and arch.share_embeddings}
        differ = [k for k in shared if not torch.equal(gen_state[k], state[k.replace("generator.", "encoder.", 1)])]
        state.update({k: v for k, v in gen_state.items() if k not in shared})
        unused |= {f"generator/{k}" for k in gen_unused} | {f"generator/{k} (differs)" for k in differ}
    ignored = re.compile("|".join(family.ignored)) if family.ignored else None
    unused = sorted(k for k in unused if not (ignored and ignored.search(k)))
    if not any(k.startswith("encoder.") for k in state):
        raise PtmError(f"{what}: the weights in '{path}' hold no {family.model_type} encoder ptm recognises.")
    return Imported(family.family, arch, state, tokenizer, unused)


def tokens_of(tokenizer: Tokenizer) -> Tokens:
    ids = SpecialIds.of(tokenizer)
    return Tokens(ids.pad, ids.cls, ids.sep, ids.unk, tokenizer.get_vocab_size())


def unmapped(family: HfFamily, arch, state: dict[str, torch.Tensor], rules: list) -> list[str]:
    """ptm's keys that no rule gives a Hugging Face name (a tied copy of a named tensor counts as named)."""
    mapped = covered(state, rules, family.layer_counts(arch))
    named = {state[k].data_ptr() for k in mapped}
    return [k for k in state if k not in mapped and state[k].data_ptr() not in named]


def hf_state(family: HfFamily, arch, tokenizer: Tokenizer, state: dict[str, torch.Tensor], rules=None) -> dict:
    """ptm's state dict (pretraining model, or encoder under `encoder.`) -> Hugging Face names, plus the zero
    tensors Hugging Face's model has where ptm's has nothing."""
    tokens = tokens_of(tokenizer)
    rules = rules if rules is not None else family.rules(arch, tokens)
    return {**family.extras(arch, tokens), **to_theirs(state, rules, family.layer_counts(arch))}


def model_config(family: HfFamily, arch, tokenizer: Tokenizer, architecture: str, labels=None, **fields) -> dict:
    """config.json: the family's fields, the class to load, and a task's label names."""
    config = {
        "model_type": family.model_type,
        "architectures": [architecture],
        "vocab_size": tokenizer.get_vocab_size(),
        **family.config_from_arch(arch, tokens_of(tokenizer)),
        **fields,
    }
    if labels:
        config.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return config


def generation_config(config: dict, **decoding) -> dict:
    """generation_config.json: the special ids decoding needs, and decoding settings (beams, lengths)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_eos_token_id")
    return {**{k: config[k] for k in keys if k in config}, **decoding}


def tokenizer_files(tokenizer: Tokenizer, family: HfFamily, max_length: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for `AutoTokenizer` over ptm's tokenizer.json."""
    ids = SpecialIds.of(tokenizer)
    names = {
        "pad_token": ids.pad,
        "unk_token": ids.unk,
        "cls_token": ids.cls,
        "sep_token": ids.sep,
        "bos_token": ids.cls,
        "eos_token": ids.sep,
        **({"mask_token": ids.mask} if ids.mask is not None else {}),
    }
    special = {k: tokenizer.id_to_token(v) for k, v in names.items()}
    segments = family.family in ("bert", "electra", "xlnet")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "model_input_names": ["input_ids", *(["token_type_ids"] if segments else []), "attention_mask"],
        "clean_up_tokenization_spaces": False,
        **special,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def write_dir(
    out: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    family: HfFamily,
    max_length: int,
    generation: dict | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    for name, value in tokenizer_files(tokenizer, family, max_length).items():
        (out / name).write_text(json.dumps(value, indent=2) + "\n")
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> tuple[list[str], list[str]]:
    """Load an imported state dict into a ptm model. Returns (the model's keys the checkpoint did not fill: heads
    it lacks, which keep their fresh initialisation; the checkpoint's keys the model has no place for: e.g.
    BERT's pooler under objective=mlm). Tied copies of a filled tensor count as filled."""
    own = model.state_dict()
    unused = sorted(k for k in state if k not in own)
    try:
        missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise PtmError(f"{what}: the checkpoint's tensors do not fit ptm's model: {err}") from err
    filled = {own[k].data_ptr() for k in state if k in own}
    return [k for k in missing if own[k].data_ptr() not in filled], unused
