"""Encoder-decoder language modelling: teacher-forced cross-entropy of the target tokens given the input
(T5 span corruption, BART denoising, text-to-text fine-tuning). The term is named after what it trains."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Seq2SeqLM:
    def __init__(self, term: str):
        self.terms = (term,)
        self.stats = (f"{term}_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        labels = batch["labels"]
        keep = labels != -100
        logits, targets = logits[keep].float(), labels[keep]
        (term,) = self.terms
        return (
            {term: F.cross_entropy(logits, targets, reduction="sum")},
            {f"{term}_correct": (logits.argmax(-1) == targets).sum()},
        )

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        (term,) = self.terms
        loss = sums[term] / counts[term]
        return {
            f"{term}_loss": loss,
            f"{term}_accuracy": stats[f"{term}_correct"] / counts[term],
            "perplexity": math.exp(min(loss, 50.0)),
            "loss": loss,
        }
