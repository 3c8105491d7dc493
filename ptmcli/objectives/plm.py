"""Permutation language modelling (XLNet): predict the last 1/K of a sampled factorisation order, each target
from the tokens before it in that order, through the query stream."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PermutationLM:
    terms = ("plm",)
    stats = ("plm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["rank"], batch["target_mask"]).float()
        targets = batch["targets"]
        sums = {"plm": F.cross_entropy(logits, targets, reduction="sum")}
        return sums, {"plm_correct": (logits.argmax(-1) == targets).sum()}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        loss = sums["plm"] / counts["plm"]
        return {
            "plm_loss": loss,
            "plm_accuracy": stats["plm_correct"] / counts["plm"],
            "perplexity": math.exp(min(loss, 50.0)),
            "loss": loss,
        }
