"""Permutation language modelling (XLNet): predict the last 1/K of a sampled factorisation order, each target
from the tokens before it in that order, through the query stream."""

from __future__ import annotations

import math

import torch
from torch import nn


class PermutationLM:
    terms = ("plm",)
    stats = ("plm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        targets = batch["targets"]
        out = model(
            batch["input_ids"], batch["attention_mask"], batch["rank"], batch["target_mask"], targets,
            predict=not model.training,
        )  # fmt: skip
        if out.predicted is None:  # accuracy is read only by evaluation
            return {"plm": out.loss}, {"plm_correct": torch.zeros((), device=targets.device)}
        return {"plm": out.loss}, {"plm_correct": (out.predicted == targets).sum()}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        loss = sums["plm"] / counts["plm"]
        return {
            "plm_loss": loss,
            "plm_accuracy": stats["plm_correct"] / counts["plm"],
            "perplexity": math.exp(min(loss, 50.0)),
            "loss": loss,
        }
