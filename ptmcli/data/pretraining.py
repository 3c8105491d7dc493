"""Pretraining examples: documents -> sentences -> packed chunks -> masked (and NSP) examples.

Packing has three layouts: whole sentences of one document (NSP), a stream of documents cut into blocks that
get [CLS] ... [SEP] around them (MLM, RTD, PLM), and bare blocks (causal LM). Every token carries a
word-start flag, from the tokenizer's words or from jieba's Chinese words, for whole-word masking.

Tokenization and packing run once through `datasets.map` and are cached by fingerprint. Everything
random (NSP pairing, masking) is drawn when an example is served, from a generator seeded by
(seed, epoch, example index): the same example gets the same masks however many processes train,
and a new set of masks every epoch (dynamic masking).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from ptmcli.data.tokenizer import SpecialIds, tokenizer_digest
from ptmcli.schema import ObjectiveConfig

if TYPE_CHECKING:
    import datasets

_LINE_BREAK = re.compile(r"\s*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z0-9])|(?<=[。！？])")
# sentences of one document (NSP) | a stream cut into blocks wrapped in [CLS] .. [SEP] | bare blocks (causal LM)
LAYOUTS = ("sentences", "blocks-cls-sep", "blocks")


def split_sentences(text: str) -> list[str]:
    """Lines, then sentence ends within a line; good enough for NSP segment boundaries."""
    return [s for line in _LINE_BREAK.split(text.strip()) for s in _SENTENCE_END.split(line) if s.strip()]


def word_starts(encoding, text: str, segmenter: str) -> list[int]:
    """1 where a token begins a word: a new word of the tokenizer's pre-tokenizer, or of jieba's segmentation."""
    if segmenter == "jieba":
        from ptmcli.data.chinese import jieba_word_ids

        words = jieba_word_ids(text)
        keys = [words[start] if start < len(words) else -1 for start, _ in encoding.offsets]
    else:
        keys = encoding.word_ids
    return [int(i == 0 or k is None or k != keys[i - 1]) for i, k in enumerate(keys)]


def _tokenize(batch: dict, tokenizer: Tokenizer, segmenter: str) -> dict:
    per_doc = [split_sentences(t) for t in batch["text"]]
    encoded = iter(tokenizer.encode_batch([s for doc in per_doc for s in doc], add_special_tokens=False))
    ids, lens, starts = [], [], []
    for doc in per_doc:
        doc_ids, doc_lens, doc_starts = [], [], []
        for text in doc:
            encoding = next(encoded)
            if encoding.ids:
                doc_ids.extend(encoding.ids)
                doc_lens.append(len(encoding.ids))
                doc_starts.extend(word_starts(encoding, text, segmenter))
        ids.append(doc_ids)
        lens.append(doc_lens)
        starts.append(doc_starts)
    return {"ids": ids, "sent_lens": lens, "starts": starts}


def _chunk_by_sentences(batch: dict, indices: list[int], max_tokens: int) -> dict:
    """Greedily group whole sentences of one document into chunks of at most `max_tokens`.
    A sentence longer than that is cut into pieces, so no token is dropped."""
    out = {"ids": [], "sent_lens": [], "starts": [], "doc": []}

    def emit(chunk, chunk_lens, chunk_starts, doc):
        out["ids"].append(chunk), out["sent_lens"].append(chunk_lens)
        out["starts"].append(chunk_starts), out["doc"].append(doc)

    for ids, lens, starts, doc in zip(batch["ids"], batch["sent_lens"], batch["starts"], indices):
        chunk, chunk_lens, chunk_starts, pos = [], [], [], 0
        for n in lens:
            for start in range(pos, pos + n, max_tokens):
                end = min(start + max_tokens, pos + n)
                if chunk and len(chunk) + end - start > max_tokens:
                    emit(chunk, chunk_lens, chunk_starts, doc)
                    chunk, chunk_lens, chunk_starts = [], [], []
                chunk = chunk + ids[start:end]
                chunk_starts = chunk_starts + starts[start:end]
                chunk_lens.append(end - start)
            pos += n
        if chunk:
            emit(chunk, chunk_lens, chunk_starts, doc)
    return out


def _pack_stream(batch: dict, indices: list[int], max_tokens: int, sep_id: int) -> dict:
    """Concatenate documents (separated by [SEP]) and cut the stream into blocks of `max_tokens`.
    The last, shorter block of each map batch is kept, padded later, not dropped."""
    stream, owner, starts = [], [], []
    for ids, doc_starts, doc in zip(batch["ids"], batch["starts"], indices):
        if stream:
            stream.append(sep_id), owner.append(doc), starts.append(1)
        stream.extend(ids)
        owner.extend([doc] * len(ids))
        starts.extend(doc_starts)
    cuts = [i for i in range(0, len(stream), max_tokens) if stream[i : i + max_tokens] != [sep_id]]
    return {
        "ids": [stream[i : i + max_tokens] for i in cuts],
        "sent_lens": [[len(stream[i : i + max_tokens])] for i in cuts],
        "starts": [[1, *starts[i + 1 : i + max_tokens]] for i in cuts],
        "doc": [owner[i] for i in cuts],
    }


def build_chunks(
    docs: datasets.Dataset,
    tokenizer: Tokenizer,
    max_seq_len: int,
    layout: str,
    num_proc: int | None,
    segmenter: str = "none",
) -> datasets.Dataset:
    """Tokenize and pack `docs` in `layout` (one of LAYOUTS), cached by datasets under fingerprints of input,
    tokenizer and settings."""
    import datasets  # here, not at the top: a run training from a token directory never loads it

    tok_key = f"{docs._fingerprint}:{tokenizer_digest(tokenizer)}:{segmenter}:v2"
    tok_fp = hashlib.sha1(tok_key.encode()).hexdigest()[:16]
    tokenized = docs.map(
        _tokenize,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer": tokenizer, "segmenter": segmenter},
        remove_columns=docs.column_names,
        new_fingerprint=tok_fp,
        num_proc=num_proc,
        desc="tokenizing",
    )
    chunk_fp = hashlib.sha1(f"{tok_fp}:{layout}:{max_seq_len}:v2".encode()).hexdigest()[:16]
    sep = SpecialIds.of(tokenizer).sep
    if layout == "sentences":
        fn, kwargs = _chunk_by_sentences, {"max_tokens": max_seq_len - 3}
    elif layout == "blocks-cls-sep":
        fn, kwargs = _pack_stream, {"max_tokens": max_seq_len - 2, "sep_id": sep}
    else:  # bare blocks: a causal LM sees documents separated by the end token
        fn, kwargs = _pack_stream, {"max_tokens": max_seq_len, "sep_id": sep}
    return tokenized.map(
        fn,
        batched=True,
        batch_size=1000,
        with_indices=True,
        fn_kwargs=kwargs,
        remove_columns=tokenized.column_names,
        features=datasets.Features(
            {
                "ids": datasets.Sequence(datasets.Value("int32")),
                "sent_lens": datasets.Sequence(datasets.Value("int32")),
                "starts": datasets.Sequence(datasets.Value("int8")),
                "doc": datasets.Value("int64"),
            }
        ),
        new_fingerprint=chunk_fp,
        desc="packing",
    )


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    cfg: ObjectiveConfig,
    special: np.ndarray,
    mask_id: int,
    random_pool: np.ndarray,
    starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sequence: choose round(mask_prob * candidates) non-special positions; of those
    80 % -> [MASK], 10 % -> a random non-special token, 10 % unchanged. Returns (inputs, labels with -100).

    With `starts` (1 where a word begins), whole words are chosen: words in random order, each taken whole
    unless it would overshoot the budget, as the original whole-word masking does."""
    candidates = np.flatnonzero(~np.isin(ids, special))
    labels = np.full_like(ids, -100)
    if len(candidates) == 0:
        return ids, labels
    n = min(len(candidates), max(1, int(round(len(candidates) * cfg.mask_prob))))
    if starts is None:
        chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    else:
        chosen = np.sort(np.concatenate(choose_words(word_groups(candidates, starts), n, rng)))
        n = len(chosen)
    labels[chosen] = ids[chosen]
    inputs = ids.copy()
    r = rng.random(n)
    inputs[chosen[r < cfg.mask_token_prob]] = mask_id
    swap = chosen[(r >= cfg.mask_token_prob) & (r < cfg.mask_token_prob + cfg.random_token_prob)]
    inputs[swap] = random_pool[rng.integers(0, len(random_pool), size=len(swap))]
    return inputs, labels


def word_groups(candidates: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """Split candidate positions into words: a new word at a start flag or wherever positions are not adjacent."""
    breaks = np.flatnonzero((starts[candidates[1:]] == 1) | (np.diff(candidates) != 1)) + 1
    return np.split(candidates, breaks)


def choose_words(groups: list[np.ndarray], budget: int, rng: np.random.Generator) -> list[np.ndarray]:
    chosen, total = [], 0
    for k in rng.permutation(len(groups)):
        if total >= budget:
            break
        if total + len(groups[k]) > budget and total:
            continue
        chosen.append(groups[k])
        total += len(groups[k])
    return chosen


@dataclass
class PretrainingExamples:
    """Serves masked (and NSP) examples from packed chunks; `batch(indices, epoch)` collates tensors."""

    chunks: datasets.Dataset
    tokenizer: Tokenizer
    objective: ObjectiveConfig
    seed: int
    nsp: bool

    def __post_init__(self) -> None:
        self.ids = SpecialIds.of(self.tokenizer, need_mask=True)
        self.special = np.array([self.ids.pad, self.ids.unk, self.ids.cls, self.ids.sep, self.ids.mask])
        vocab = np.arange(self.tokenizer.get_vocab_size())
        self.random_pool = vocab[~np.isin(vocab, self.special)]

    def __len__(self) -> int:
        return len(self.chunks)

    def _nsp_segments(self, row: dict, index: int, rng: np.random.Generator) -> tuple[list, list, int, list, list]:
        """(A, B, label, A's word starts, B's word starts): label 0 = B is the true continuation, 1 = B comes
        from another document."""
        ids, lens, starts = row["ids"], row["sent_lens"], row["starts"]
        if len(lens) >= 2:
            cut = int(np.cumsum(lens)[rng.integers(0, len(lens) - 1)])
        else:  # one long sentence: split it inside, so the continuation is still the true one
            cut = int(rng.integers(1, len(ids))) if len(ids) > 1 else 1
        a, b = ids[:cut], ids[cut:]
        if (rng.random() < self.objective.nsp_random_prob or not b) and len(self.chunks) > 1:
            budget = max(1, len(ids) - len(a))
            for _attempt in range(10):  # prefer a chunk of another document; tiny corpora may have one
                j = int(rng.integers(0, len(self.chunks) - 1))
                other = self.chunks[j + (j >= index)]  # any chunk but this one
                if other["doc"] != row["doc"]:
                    break
            sentence_starts = np.concatenate([[0], np.cumsum(other["sent_lens"])[:-1]])
            start = int(sentence_starts[rng.integers(0, len(sentence_starts))])
            b = other["ids"][start : start + budget]
            return a, b, 1, starts[:cut], other["starts"][start : start + budget]
        return a, b, 0, starts[:cut], starts[cut:]

    def example(self, row: dict, index: int, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.nsp:
            a, b, label, a_starts, b_starts = self._nsp_segments(row, index, rng)
            tokens = [self.ids.cls, *a, self.ids.sep, *b, self.ids.sep]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
            starts = [1, 1, *a_starts[1:], 1, 1, *b_starts[1:], 1][: len(tokens)]  # each segment opens a word
        else:
            tokens, types, label = [self.ids.cls, *row["ids"], self.ids.sep], [0] * (len(row["ids"]) + 2), -100
            starts = [1, *row["starts"], 1]
        inputs, labels = mask_tokens(
            np.array(tokens),
            rng,
            self.objective,
            self.special,
            self.ids.mask,
            self.random_pool,
            np.array(starts) if self.objective.whole_word_mask else None,
        )
        return {"input_ids": inputs, "token_type_ids": np.array(types), "labels": labels, "nsp_label": label}

    def batch(self, indices: list[int], epoch: int) -> dict:
        rows = self.chunks[list(indices)]
        examples = [self.example({k: rows[k][i] for k in rows}, int(index), epoch) for i, index in enumerate(indices)]
        return collate(examples, self.ids.pad, self.nsp)


def collate(examples: list[dict], pad_id: int, nsp: bool) -> dict:
    """Pad to the longest example. `counts` holds the number of loss targets per term, which the loop
    uses to normalise the loss over the whole (possibly multi-process, accumulated) batch."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.from_numpy(e["input_ids"])
        token_type_ids[i, :n] = torch.from_numpy(e["token_type_ids"])
        labels[i, :n] = torch.from_numpy(e["labels"])
        attention_mask[i, :n] = 1
    positions = labels != -100
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "mlm_positions": positions,
        "mlm_targets": labels[positions],
        # loss targets per term: masked tokens (MLM), every real token (ELECTRA's replaced-token detection)
        "counts": {"mlm": int(positions.sum()), "rtd": int(attention_mask.sum())},
        "num_tokens": int(attention_mask.sum()),
    }
    if nsp:
        batch["nsp_labels"] = torch.tensor([e["nsp_label"] for e in examples], dtype=torch.long)
        batch["counts"]["nsp"] = B
    return batch
