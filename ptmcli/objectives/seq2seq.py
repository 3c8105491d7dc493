"""Encoder-decoder language modelling: teacher-forced cross-entropy of the target tokens given the input
(T5 span corruption, BART denoising, text-to-text fine-tuning). A term is named after what it trains; with
several terms (span corruption with whole-block targets) the batch's `label_terms` says whose each row is."""

from __future__ import annotations

import math

import torch
from torch import nn

from ptmcli.models.vocab_loss import IGNORE, correct


class Seq2SeqLM:
    def __init__(self, *terms: str):
        self.terms = terms
        self.stats = tuple(f"{t}_correct" for t in terms)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        labels = batch["labels"]
        if len(self.terms) > 1:  # each row's labels belong to one term
            targets = [
                labels.masked_fill(~(batch["label_terms"] == k)[:, None], IGNORE) for k in range(len(self.terms))
            ]
        else:
            targets = [labels]
        outs = model(
            batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], targets=targets,
            predict=not model.training,
        )  # fmt: skip
        sums, stats = {}, {}
        for term, t, out in zip(self.terms, targets, outs):
            sums[term] = out.loss  # 0 when no row has this term
            stats[f"{term}_correct"] = correct(out, t)
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
