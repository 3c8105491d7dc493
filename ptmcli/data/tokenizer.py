"""BERT WordPiece tokenizers: load a given tokenizer.json / vocab.txt, or train one with `tokenizers`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ptmcli.data.sources import cache_root, package_path
from ptmcli.errors import PtmError
from ptmcli.schema import DataConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "SpecialIds":
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise PtmError(
                f"The tokenizer has no {', '.join(missing)} token; a BERT tokenizer needs all of {SPECIAL_TOKENS}."
            )
        return cls(*(ids[t] for t in SPECIAL_TOKENS))


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


def load_tokenizer(spec: str, lowercase: bool = True) -> Tokenizer:
    """A tokenizer.json, a vocab.txt, or a directory holding one of them."""
    path = package_path(spec, "data.tokenizer") if spec.startswith("pkg://") else Path(spec).expanduser()
    if path.is_dir():
        path = next((path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).exists()), path / "tokenizer.json")
    if not path.exists():
        raise PtmError(
            f"data.tokenizer='{spec}' does not exist; give a tokenizer.json, a vocab.txt or a directory with one."
        )
    try:
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


def train_tokenizer(texts: datasets.Dataset, cfg: DataConfig) -> Tokenizer:
    """Train a WordPiece tokenizer on the training documents, cached by corpus fingerprint and settings."""
    key = f"{texts._fingerprint}:{cfg.vocab_size}:{cfg.lowercase}:{cfg.min_frequency}:wordpiece-v1"
    cached = cache_root() / "tokenizers" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if cached.exists():
        return Tokenizer.from_file(str(cached))
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), cfg.lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    batches = (texts[i : i + 1000]["text"] for i in range(0, len(texts), 1000))
    tok.train_from_iterator(batches, trainer=trainer, length=len(texts))
    _add_post_processor(tok)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, cached)
    return tok


def get_tokenizer(train_docs: datasets.Dataset, cfg: DataConfig) -> Tokenizer:
    tok = load_tokenizer(cfg.tokenizer, cfg.lowercase) if cfg.tokenizer else train_tokenizer(train_docs, cfg)
    SpecialIds.of(tok)
    return tok


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha1(tokenizer.to_str().encode()).hexdigest()[:16]
