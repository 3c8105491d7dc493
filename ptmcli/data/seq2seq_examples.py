"""Encoder-decoder pretraining examples: T5 span corruption and BART denoising.

T5 (Raffel et al. 2020, and its reference code): drop noise_density of the tokens in spans of mean length
mean_span_length; the input keeps a sentinel in place of each span, the target lists each sentinel followed by
the span it replaced. BART (Lewis et al. 2020): shuffle the sentences, then replace spans with Poisson(lambda)
lengths, covering mask_ratio of the tokens, by one <mask> each (a 0-length span inserts one); the target is
the original text. Everything random comes from (seed, epoch, index), as for masking.

Span corruption never asks the decoder to copy: every target token is missing from the input. With
full_target_fraction > 0 that share of the examples keeps the corrupted input but targets the whole original
block, as in the paper's BERT-style variants, so the decoder also learns to copy the kept text (term `full`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from ptmcli.data.padding import pad
from ptmcli.data.tokenizer import SpecialIds, sentinel_ids
from ptmcli.schema import ObjectiveConfig

if TYPE_CHECKING:  # a training process reading a token directory never loads datasets (pandas, pyarrow)
    import datasets


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """`n_segments` positive lengths summing to `n_items`, uniformly over such splits."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True = corrupted; alternating kept/corrupted spans, starting with a kept one."""
    noise = int(np.clip(round(length * density), 1, length - 1))
    spans = int(max(1, min(round(noise / mean_span), noise, length - noise)))
    noise_lengths = random_segmentation(noise, spans, rng)
    kept_lengths = random_segmentation(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for kept, corrupted in zip(kept_lengths, noise_lengths):
        position += kept
        mask[position : position + corrupted] = True
        position += corrupted
    return mask


def corrupt_spans(ids: list[int], mask: np.ndarray, sentinels: list[int], end: int) -> tuple[list[int], list[int]]:
    """(inputs, targets): each corrupted span becomes the next sentinel in the input; the target is
    sentinel_0 span_0 sentinel_1 span_1 ... and both end with the end token."""
    inputs, targets, k = [], [], 0
    for i, (token, corrupted) in enumerate(zip(ids, mask)):
        if not corrupted:
            inputs.append(token)
            continue
        if i == 0 or not mask[i - 1]:
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
            k += 1
        targets.append(token)
    return inputs + [end], targets + [end]


def infill(ids: list[int], ratio: float, lam: float, mask_id: int, rng: np.random.Generator) -> list[int]:
    """BART text infilling: Poisson-length spans covering ~ratio of the tokens, each replaced by one mask."""
    n = len(ids)
    budget = int(round(n * ratio))
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(int(rng.poisson(lam)))
    if lengths and sum(lengths) > budget:
        lengths[-1] -= sum(lengths) - budget
    covered = np.zeros(n + 1, dtype=bool)
    insert = np.zeros(n + 1, dtype=bool)
    for start, length in zip(rng.integers(0, n, size=len(lengths)), lengths):
        if length == 0:
            insert[start] = True
        else:
            covered[start : start + length] = True
    out = []
    for i, token in enumerate(ids):
        if insert[i]:
            out.append(mask_id)
        if covered[i]:
            if i == 0 or not covered[i - 1]:
                out.append(mask_id)
        else:
            out.append(token)
    return out


def collate_seq2seq(examples: list[dict], pad_id: int, terms: tuple[str, ...]) -> dict:
    """Pad encoder inputs, decoder inputs and labels (-100 where padded). An example's labels count towards
    terms[example["term"]] (default the first); `label_terms` says which, per row."""
    input_ids = pad([e["inputs"] for e in examples], pad_id)
    decoder = pad([e["decoder_inputs"] for e in examples], pad_id)
    labels = pad([e["labels"] for e in examples], -100)
    attention_mask = pad([np.ones(len(e["inputs"])) for e in examples], 0)
    label_terms = torch.tensor([e.get("term", 0) for e in examples], dtype=torch.long)
    per_row = (labels != -100).sum(1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder,
        "labels": labels,
        "label_terms": label_terms,
        "counts": {t: int(per_row[label_terms == k].sum()) for k, t in enumerate(terms)},
        "num_tokens": int(attention_mask.sum()) + int(per_row.sum()),
    }


@dataclass
class SpanCorruptionExamples:
    chunks: datasets.Dataset
    tokenizer: Tokenizer
    objective: ObjectiveConfig
    seed: int

    def __post_init__(self) -> None:
        self.ids = SpecialIds.of(self.tokenizer)
        self.sentinels = sentinel_ids(self.tokenizer)
        self.terms = ("span", "full") if self.objective.full_target_fraction > 0 else ("span",)

    def __len__(self) -> int:
        return len(self.chunks)

    def example(self, ids: list[int], index: int, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        if len(ids) < 2:
            inputs, targets = [*ids, self.ids.sep], [self.ids.sep]
        else:
            mask = span_noise_mask(len(ids), self.objective.noise_density, self.objective.mean_span_length, rng)
            inputs, targets = corrupt_spans(ids, mask, self.sentinels, self.ids.sep)
        # drawn after the mask, so that fraction 0 gives exactly the paper's examples
        full = bool(rng.random() < self.objective.full_target_fraction)
        if full:
            targets = [*ids, self.ids.sep]
        # T5 starts decoding from the padding token
        return {"inputs": inputs, "decoder_inputs": [self.ids.pad, *targets[:-1]], "labels": targets, "term": int(full)}

    def batch(self, indices: list[int], epoch: int) -> dict:
        rows = self.chunks[list(indices)]["ids"]
        examples = [self.example(r, int(i), epoch) for r, i in zip(rows, indices)]
        return collate_seq2seq(examples, self.ids.pad, self.terms)


@dataclass
class DenoisingExamples:
    """Chunks of whole sentences (the `sentences` layout) -> <s> noised </s>, rebuilt as <s> original </s>."""

    chunks: datasets.Dataset
    tokenizer: Tokenizer
    objective: ObjectiveConfig
    seed: int

    def __post_init__(self) -> None:
        self.ids = SpecialIds.of(self.tokenizer, need_mask=True)

    def __len__(self) -> int:
        return len(self.chunks)

    def example(self, row: dict, index: int, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        ids, o = row["ids"], self.objective
        noised = ids
        if o.permute_sentences and len(row["sent_lens"]) > 1:
            bounds = np.concatenate([[0], np.cumsum(row["sent_lens"])])
            sentences = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            noised = [t for k in rng.permutation(len(sentences)) for t in sentences[k]]
        noised = infill(noised, o.mask_ratio, o.poisson_lambda, self.ids.mask, rng)
        target = [self.ids.cls, *ids, self.ids.sep]
        # BART's decoder starts from the end token, then reads the target shifted right
        return {
            "inputs": [self.ids.cls, *noised, self.ids.sep],
            "decoder_inputs": [self.ids.sep, *target[:-1]],
            "labels": target,
        }

    def batch(self, indices: list[int], epoch: int) -> dict:
        rows = self.chunks[list(indices)]
        examples = [self.example({k: rows[k][i] for k in rows}, int(idx), epoch) for i, idx in enumerate(indices)]
        return collate_seq2seq(examples, self.ids.pad, ("denoise",))
