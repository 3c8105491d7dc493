"""What every fine-tuning task shares: encoded features served as padded batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from ptmcli.data.padding import pad


def task_tokenizer(tokenizer: Tokenizer, max_len: int, stride: int = 0, strategy: str = "longest_first") -> Tokenizer:
    """A private copy with the task's truncation, so settings never leak between tasks."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=max_len, stride=stride, strategy=strategy)
    return tok


def encoder_inputs(features: list[dict], pad_id: int) -> dict:
    ids = pad([f["input_ids"] for f in features], pad_id)
    return {
        "input_ids": ids,
        "token_type_ids": pad([f["type_ids"] for f in features], 0),
        "attention_mask": pad([np.ones(len(f["input_ids"])) for f in features], 0),
    }


@dataclass
class EncodedExamples:
    """Features (dicts of arrays) of one split; `collate` turns a list of them into a batch."""

    features: list[dict]
    collate: Callable[[list[dict]], dict]
    groups: list[tuple[int, int]] = field(default_factory=list)  # qa: feature ranges of one example each

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, indices: list[int], epoch: int) -> dict:
        return self.collate([self.features[i] for i in indices])

    def eval_ranges(self, batch_size: int) -> list[tuple[int, int]]:
        """Batches that never split one example's features (needed to score QA per example)."""
        if not self.groups:
            return [(s, min(s + batch_size, len(self))) for s in range(0, len(self), batch_size)]
        ranges, start = [], 0
        for first, last in self.groups:
            if last - start > batch_size and first > start:
                ranges.append((start, first))
                start = first
        ranges.append((start, len(self)))
        return ranges
