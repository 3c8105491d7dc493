"""Encoder-decoder language modelling: teacher-forced cross-entropy of the target tokens given the input
(T5 span corruption, BART denoising, text-to-text fine-tuning). A term is named after what it trains; with
several terms (span corruption with whole-block targets) the batch's `label_terms` says whose each row is."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Seq2SeqLM:
    def __init__(self, *terms: str):
        self.terms = terms
        self.stats = tuple(f"{t}_correct" for t in terms)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        labels = batch["labels"]
        labelled = labels != -100
        sums, stats = {}, {}
        for k, term in enumerate(self.terms):
            keep = labelled & (batch["label_terms"] == k)[:, None] if len(self.terms) > 1 else labelled
            term_logits, targets = logits[keep].float(), labels[keep]
            sums[term] = F.cross_entropy(term_logits, targets, reduction="sum")  # 0 when no row has this term
            stats[f"{term}_correct"] = (term_logits.argmax(-1) == targets).sum()
        return sums, stats

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        out = {}
        for term in self.terms:
            if counts[term]:
                out[f"{term}_loss"] = sums[term] / counts[term]
                out[f"{term}_accuracy"] = stats[f"{term}_correct"] / counts[term]
        main = out.get(f"{self.terms[0]}_loss", 0.0)
        out["perplexity"] = math.exp(min(main, 50.0))
        out["loss"] = sum(out.get(f"{t}_loss", 0.0) for t in self.terms)
        return out
