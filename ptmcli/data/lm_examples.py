"""Causal-LM and permutation-LM examples from packed blocks (see `pretraining.build_chunks`).

As with masking, everything random is drawn from (seed, epoch, example index), so an example is the same
however many processes train and whether or not the run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

from ptmcli.data.padding import pad
from ptmcli.data.tokenizer import SpecialIds
from ptmcli.schema import ObjectiveConfig

if TYPE_CHECKING:  # a training process reading a token directory never loads datasets (pandas, pyarrow)
    import datasets


@dataclass
class CausalExamples:
    """Bare blocks of the document stream; the target of each token is the next one."""

    chunks: datasets.Dataset
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        self.pad_id = SpecialIds.of(self.tokenizer).pad

    def __len__(self) -> int:
        return len(self.chunks)

    def batch(self, indices: list[int], epoch: int) -> dict:
        rows = [np.asarray(r) for r in self.chunks[list(indices)]["ids"]]
        lengths = torch.tensor([len(r) for r in rows])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        return {
            "input_ids": pad(rows, self.pad_id),
            "attention_mask": mask,
            "counts": {"clm": int((lengths - 1).clamp(min=0).sum())},
            "num_tokens": int(lengths.sum()),
        }


def permutation(n: int, candidates: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A factorisation order over `n` positions whose last ~1/k are predicted (XLNet's partial prediction).

    Returns (rank of each position in the order, target positions). Only `candidates` (non-special tokens)
    may be targets; at least one position is never a target, so every target has some context."""
    n_targets = min(len(candidates), n - 1, max(1, int(round(len(candidates) / k))))
    targets = np.sort(rng.choice(candidates, size=n_targets, replace=False)) if n_targets > 0 else candidates[:0]
    is_target = np.zeros(n, dtype=bool)
    is_target[targets] = True
    order = np.concatenate([rng.permutation(np.flatnonzero(~is_target)), rng.permutation(targets)])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank, targets


@dataclass
class PermutationExamples:
    """[CLS] block [SEP] with a sampled factorisation order (as ranks) and its targets."""

    chunks: datasets.Dataset
    tokenizer: Tokenizer
    objective: ObjectiveConfig
    seed: int

    def __post_init__(self) -> None:
        self.ids = SpecialIds.of(self.tokenizer)
        self.special = np.array([self.ids.pad, self.ids.unk, self.ids.cls, self.ids.sep])

    def __len__(self) -> int:
        return len(self.chunks)

    def example(self, ids: list[int], index: int, epoch: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        tokens = np.array([self.ids.cls, *ids, self.ids.sep])
        candidates = np.flatnonzero(~np.isin(tokens, self.special))
        rank, targets = permutation(len(tokens), candidates, self.objective.plm_k, rng)
        return {"input_ids": tokens, "rank": rank, "targets": targets}

    def batch(self, indices: list[int], epoch: int) -> dict:
        rows = self.chunks[list(indices)]["ids"]
        examples = [self.example(r, int(i), epoch) for r, i in zip(rows, indices)]
        input_ids = pad([e["input_ids"] for e in examples], self.ids.pad)
        T = input_ids.shape[1]
        # padding comes last in every order, so no real token ever sees it
        rank = pad([e["rank"] for e in examples], T)
        attention_mask = pad([np.ones(len(e["input_ids"])) for e in examples], 0)
        target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, e in enumerate(examples):
            target_mask[i, e["targets"]] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "rank": rank,
            "target_mask": target_mask,
            "targets": input_ids[target_mask],
            "counts": {"plm": int(target_mask.sum())},
            "num_tokens": int(attention_mask.sum()),
        }


@dataclass
class SentenceExamples:
    """Whole sentences of one document (`sentences` layout), each framed as [CLS] ... [SEP]: the texts unsupervised
    SimCSE encodes twice. Nothing is random, so an example is the same in every process and after a resume."""

    chunks: datasets.Dataset
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        self.ids = SpecialIds.of(self.tokenizer)

    def __len__(self) -> int:
        return len(self.chunks)

    def batch(self, indices: list[int], epoch: int) -> dict:
        rows = [np.array([self.ids.cls, *r, self.ids.sep]) for r in self.chunks[list(indices)]["ids"]]
        lengths = torch.tensor([len(r) for r in rows])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        return {
            "input_ids": pad(rows, self.ids.pad),
            "token_type_ids": torch.zeros_like(mask),
            "attention_mask": mask,
            "counts": {"contrastive": len(rows)},
            "num_tokens": int(lengths.sum()),
        }
