"""Pretraining examples: documents -> sentences -> packed chunks -> masked (and NSP) examples.

Tokenization and packing run once through `datasets.map` and are cached by fingerprint. Everything
random (NSP pairing, masking) is drawn when an example is served, from a generator seeded by
(seed, epoch, example index): the same example gets the same masks however many processes train,
and a new set of masks every epoch (dynamic masking).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer

from ptmcli.data.tokenizer import SpecialIds, tokenizer_digest
from ptmcli.schema import ObjectiveConfig

_LINE_BREAK = re.compile(r"\s*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z0-9])|(?<=[。！？])")
_FEATURES = datasets.Features(
    {
        "ids": datasets.Sequence(datasets.Value("int32")),
        "sent_lens": datasets.Sequence(datasets.Value("int32")),
        "doc": datasets.Value("int64"),
    }
)


def split_sentences(text: str) -> list[str]:
    """Lines, then sentence ends within a line; good enough for NSP segment boundaries."""
    return [s for line in _LINE_BREAK.split(text.strip()) for s in _SENTENCE_END.split(line) if s.strip()]


def _tokenize(batch: dict, tokenizer: Tokenizer) -> dict:
    per_doc = [split_sentences(t) for t in batch["text"]]
    encoded = iter(tokenizer.encode_batch([s for doc in per_doc for s in doc], add_special_tokens=False))
    ids, lens = [], []
    for doc in per_doc:
        doc_ids, doc_lens = [], []
        for _ in doc:
            sentence = next(encoded).ids
            if sentence:
                doc_ids.extend(sentence)
                doc_lens.append(len(sentence))
        ids.append(doc_ids)
        lens.append(doc_lens)
    return {"ids": ids, "sent_lens": lens}


def _chunk_by_sentences(batch: dict, indices: list[int], max_tokens: int) -> dict:
    """Greedily group whole sentences of one document into chunks of at most `max_tokens`.
    A sentence longer than that is cut into pieces, so no token is dropped."""
    out = {"ids": [], "sent_lens": [], "doc": []}
    for ids, lens, doc in zip(batch["ids"], batch["sent_lens"], indices):
        chunk, chunk_lens, pos = [], [], 0
        for n in lens:
            for start in range(pos, pos + n, max_tokens):
                piece = ids[start : min(start + max_tokens, pos + n)]
                if chunk and len(chunk) + len(piece) > max_tokens:
                    out["ids"].append(chunk), out["sent_lens"].append(chunk_lens), out["doc"].append(doc)
                    chunk, chunk_lens = [], []
                chunk = chunk + piece
                chunk_lens.append(len(piece))
            pos += n
        if chunk:
            out["ids"].append(chunk), out["sent_lens"].append(chunk_lens), out["doc"].append(doc)
    return out


def _pack_stream(batch: dict, indices: list[int], max_tokens: int, sep_id: int) -> dict:
    """Concatenate documents (separated by [SEP]) and cut the stream into blocks of `max_tokens`.
    The last, shorter block of each map batch is kept, padded later, not dropped."""
    stream, owner = [], []
    for ids, doc in zip(batch["ids"], indices):
        if stream:
            stream.append(sep_id), owner.append(doc)
        stream.extend(ids)
        owner.extend([doc] * len(ids))
    blocks = [stream[i : i + max_tokens] for i in range(0, len(stream), max_tokens)]
    blocks = [b for b in blocks if b != [sep_id]]
    return {
        "ids": blocks,
        "sent_lens": [[len(b)] for b in blocks],
        "doc": [owner[i] for i in range(0, len(stream), max_tokens)][: len(blocks)],
    }


def build_chunks(
    docs: datasets.Dataset, tokenizer: Tokenizer, max_seq_len: int, nsp: bool, num_proc: int | None
) -> datasets.Dataset:
    """Tokenize and pack `docs` (cached by datasets under fingerprints of input, tokenizer and settings)."""
    tok_fp = hashlib.sha1(f"{docs._fingerprint}:{tokenizer_digest(tokenizer)}:v1".encode()).hexdigest()[:16]
    tokenized = docs.map(
        _tokenize,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=docs.column_names,
        new_fingerprint=tok_fp,
        num_proc=num_proc,
        desc="tokenizing",
    )
    mode = "nsp" if nsp else "stream"
    chunk_fp = hashlib.sha1(f"{tok_fp}:{mode}:{max_seq_len}:v1".encode()).hexdigest()[:16]
    if nsp:
        fn, kwargs = _chunk_by_sentences, {"max_tokens": max_seq_len - 3}
    else:
        fn, kwargs = _pack_stream, {"max_tokens": max_seq_len - 2, "sep_id": SpecialIds.of(tokenizer).sep}
    return tokenized.map(
        fn,
        batched=True,
        batch_size=1000,
        with_indices=True,
        fn_kwargs=kwargs,
        remove_columns=tokenized.column_names,
        features=_FEATURES,
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
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one sequence: choose round(mask_prob * candidates) non-special positions; of those
    80 % -> [MASK], 10 % -> a random non-special token, 10 % unchanged. Returns (inputs, labels with -100)."""
    candidates = np.flatnonzero(~np.isin(ids, special))
    labels = np.full_like(ids, -100)
    if len(candidates) == 0:
        return ids, labels
    n = min(len(candidates), max(1, int(round(len(candidates) * cfg.mask_prob))))
    chosen = np.sort(rng.choice(candidates, size=n, replace=False))
    labels[chosen] = ids[chosen]
    inputs = ids.copy()
    r = rng.random(n)
    inputs[chosen[r < cfg.mask_token_prob]] = mask_id
    swap = chosen[(r >= cfg.mask_token_prob) & (r < cfg.mask_token_prob + cfg.random_token_prob)]
    inputs[swap] = random_pool[rng.integers(0, len(random_pool), size=len(swap))]
    return inputs, labels


@dataclass
class PretrainingExamples:
    """Serves masked (and NSP) examples from packed chunks; `batch(indices, epoch)` collates tensors."""

    chunks: datasets.Dataset
    tokenizer: Tokenizer
    objective: ObjectiveConfig
    seed: int
    nsp: bool

    def __post_init__(self) -> None:
        self.ids = SpecialIds.of(self.tokenizer)
        self.special = np.array([self.ids.pad, self.ids.unk, self.ids.cls, self.ids.sep, self.ids.mask])
        vocab = np.arange(self.tokenizer.get_vocab_size())
        self.random_pool = vocab[~np.isin(vocab, self.special)]

    def __len__(self) -> int:
        return len(self.chunks)

    def _nsp_segments(self, row: dict, index: int, rng: np.random.Generator) -> tuple[list[int], list[int], int]:
        """(A, B, label): label 0 = B is the true continuation, 1 = B comes from another document."""
        ids, lens = row["ids"], row["sent_lens"]
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
            starts = np.concatenate([[0], np.cumsum(other["sent_lens"])[:-1]])
            start = int(starts[rng.integers(0, len(starts))])
            b = other["ids"][start : start + budget]
            return a, b, 1
        return a, b, 0

    def example(self, row: dict, index: int, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.nsp:
            a, b, label = self._nsp_segments(row, index, rng)
            tokens = [self.ids.cls, *a, self.ids.sep, *b, self.ids.sep]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        else:
            tokens, types, label = [self.ids.cls, *row["ids"], self.ids.sep], [0] * (len(row["ids"]) + 2), -100
        inputs, labels = mask_tokens(
            np.array(tokens), rng, self.objective, self.special, self.ids.mask, self.random_pool
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
        "counts": {"mlm": int(positions.sum())},
        "num_tokens": int(attention_mask.sum()),
    }
    if nsp:
        batch["nsp_labels"] = torch.tensor([e["nsp_label"] for e in examples], dtype=torch.long)
        batch["counts"]["nsp"] = B
    return batch
