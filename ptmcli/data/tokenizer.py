"""Tokenizers: load a tokenizer.json, a BERT vocab.txt or a GPT-2 vocab.json + merges.txt, or train one with
`tokenizers` (BERT WordPiece, or byte-level BPE as GPT-2 and RoBERTa use).

Every family needs the same roles: padding, unknown, sequence start (cls), separator/end (sep) and, for masked
objectives, a mask token. `SpecialIds` finds them under BERT's, RoBERTa's or GPT-2's names."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ptmcli.errors import PtmError
from ptmcli.files import cache_root, package_path
from ptmcli.schema import DataConfig

if TYPE_CHECKING:
    import datasets

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BYTE_BPE_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
NUM_SENTINELS = 100
SENTINELS = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]  # T5's span-corruption placeholders
UNIGRAM_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", *SENTINELS]
GPT2_END = "<|endoftext|>"
# role -> names it goes by, in order of preference (BERT, RoBERTa, GPT-2)
ROLE_NAMES = {
    "pad": ("[PAD]", "<pad>", GPT2_END),
    "unk": ("[UNK]", "<unk>", GPT2_END),
    "cls": ("[CLS]", "<s>", GPT2_END, "</s>"),  # T5's vocabulary has no start token: its end token stands in
    "sep": ("[SEP]", "</s>", GPT2_END),
    "mask": ("[MASK]", "<mask>"),
}


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int | None  # causal-LM vocabularies (GPT-2's) have none

    @classmethod
    def of(cls, tokenizer: Tokenizer, need_mask: bool = False) -> "SpecialIds":
        ids = {}
        for role, names in ROLE_NAMES.items():
            ids[role] = next((i for n in names if (i := tokenizer.token_to_id(n)) is not None), None)
        missing = [r for r, i in ids.items() if i is None and (r != "mask" or need_mask)]
        if missing:
            raise PtmError(
                f"The tokenizer has no {' / '.join(ROLE_NAMES[missing[0]])} token (role '{missing[0]}'); "
                f"a tokenizer for this job needs tokens for {', '.join(missing)}. Use a BERT, RoBERTa or GPT-2 "
                f"style tokenizer, or leave data.tokenizer unset to train one."
            )
        return cls(**ids)


def _bert_pipeline(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
    # BERT's basic tokenizer: clean text, split CJK characters apart, optional lower-casing + accent stripping.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _add_post_processor(tokenizer: Tokenizer) -> Tokenizer:
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.token_to_id(t) for t in SENTINELS]
    if any(i is None for i in ids):
        raise PtmError(
            "objective=span-corruption needs a tokenizer with T5's sentinel tokens <extra_id_0> .. <extra_id_99>; "
            "leave data.tokenizer unset with data.tokenizer_kind=unigram to train one."
        )
    return ids


def _byte_bpe_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_end_processor(tokenizer: Tokenizer, bos: str | None, eos: str) -> Tokenizer:
    """RoBERTa-style `<s> A </s></s> B </s>`, or GPT-2 style `A <|endoftext|>` when there is no start token:
    a causal model summarises a text in its last token, so the text must end in one it knows."""
    if bos is None:
        single, pair, special = f"$A {eos}", f"$A {eos} $B:1 {eos}:1", [(eos, tokenizer.token_to_id(eos))]
    else:
        single, pair = f"{bos} $A {eos}", f"{bos} $A {eos} {eos} $B {eos}"
        special = [(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tokenizer


def load_gpt2_files(vocab_path: Path) -> Tokenizer:
    """GPT-2's vocab.json + merges.txt (the merges file beside it: merges.txt or <prefix>_merges.txt)."""
    stem = vocab_path.name.removesuffix("vocab.json")
    merges = next(
        (p for p in (vocab_path.with_name(stem + "merges.txt"), vocab_path.with_name("merges.txt")) if p.exists()),
        None,
    )
    if merges is None:
        raise PtmError(f"data.tokenizer='{vocab_path}' is a BPE vocab.json, but no merges.txt lies beside it.")
    tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges)))
    tok = _byte_bpe_pipeline(tok)
    if tok.token_to_id(GPT2_END) is not None:
        tok.add_special_tokens([GPT2_END])
        return _add_end_processor(tok, None, GPT2_END)
    return tok


def load_tokenizer(spec: str, lowercase: bool = True) -> Tokenizer:
    """A tokenizer.json, a vocab.txt, a GPT-2 style vocab.json (+ merges), or a directory holding one of them."""
    path = package_path(spec, "data.tokenizer") if spec.startswith("pkg://") else Path(spec).expanduser()
    if path.is_dir():
        names = ("tokenizer.json", "vocab.txt", "vocab.json")
        path = next((path / n for n in names if (path / n).exists()), path / "tokenizer.json")
    if not path.exists():
        raise PtmError(
            f"data.tokenizer='{spec}' does not exist; give a tokenizer.json, a vocab.txt, a vocab.json with its "
            f"merges.txt, or a directory with one of them."
        )
    try:
        if path.name.endswith("vocab.json"):
            return load_gpt2_files(path)
        if path.suffix == ".json":
            tok = Tokenizer.from_file(str(path))
            tok.no_padding()  # padding and truncation are ptm's job (collate, task settings), not the file's
            tok.no_truncation()
            return tok
        vocab = {line.rstrip("\n"): i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        return _add_post_processor(_bert_pipeline(tok, lowercase))
    except PtmError:
        raise
    except Exception as err:
        raise PtmError(f"data.tokenizer='{spec}' could not be read as a tokenizer: {err}") from err


def _continuation_pieces(tokenizer: Tokenizer, texts: datasets.Dataset) -> list[str]:
    """The continuation piece "##c" of every character c that occurs inside a word of `texts`, sorted.

    The WordPiece trainer numbers these pieces in the order its hash map of words happens to yield them, and
    breaks ties between equally frequent merges by those numbers, so two trainings on the same text gave
    different vocabularies (huggingface/tokenizers#1794). Handed to it up front, sorted, they get the same
    numbers every time, and so does every merge."""
    inside: set[str] = set()
    for start in range(0, len(texts), 1000):
        for text in texts[start : start + 1000]["text"]:
            words = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text or ""))
            inside.update("".join([word[1:] for word, _ in words]))
    return ["##" + c for c in sorted(inside)]


def _unmark_special(tokenizer: Tokenizer, pieces: set[str]) -> Tokenizer:
    """`tokenizer` with `pieces` kept in its vocabulary but no longer matched whole in raw text, as the trainer's
    special tokens are."""
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in pieces]
    return Tokenizer.from_str(json.dumps(spec))


def train_tokenizer(texts: datasets.Dataset, cfg: DataConfig, show_progress: bool = False) -> Tokenizer:
    """Train a WordPiece or byte-level BPE tokenizer on the training documents, cached by corpus fingerprint and
    settings. Byte-level BPE never lower-cases: it is lossless by design. `show_progress`: the trainer's own bars
    (documents read, merges made) on the terminal."""
    kind = cfg.tokenizer_kind
    key = f"{texts._fingerprint}:{cfg.vocab_size}:{cfg.lowercase}:{cfg.min_frequency}:{kind}-v2"
    cached = cache_root() / "tokenizers" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if cached.exists():
        return Tokenizer.from_file(str(cached))
    batches = (texts[i : i + 1000]["text"] for i in range(0, len(texts), 1000))
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        steps = [normalizers.NFKC(), *([normalizers.Lowercase()] if cfg.lowercase else [])]
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=UNIGRAM_SPECIAL_TOKENS,
            unk_token="<unk>",
            show_progress=show_progress,
        )
        tok.train_from_iterator(batches, trainer=trainer, length=len(texts))
        _add_end_processor(tok, None, "</s>")
    elif kind == "byte-bpe":
        tok = _byte_bpe_pipeline(Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=BYTE_BPE_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(batches, trainer=trainer, length=len(texts))
        _add_end_processor(tok, "<s>", "</s>")
    else:
        tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), cfg.lowercase)
        continuations = _continuation_pieces(tok, texts)
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=SPECIAL_TOKENS + continuations,
            show_progress=show_progress,
        )
        tok.train_from_iterator(batches, trainer=trainer, length=len(texts))
        tok = _unmark_special(tok, set(continuations))
        _add_post_processor(tok)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, cached)
    return tok


def get_tokenizer(
    train_docs: datasets.Dataset,
    cfg: DataConfig,
    need_mask: bool = True,
    given: Tokenizer | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """`given` (an init run's), else data.tokenizer, else one trained on the training documents."""
    if given is not None:
        tok = given
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, cfg.lowercase)
    else:
        tok = train_tokenizer(train_docs, cfg, show_progress)
    SpecialIds.of(tok, need_mask)
    return tok


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha1(tokenizer.to_str().encode()).hexdigest()[:16]
