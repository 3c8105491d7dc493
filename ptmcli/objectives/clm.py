"""Causal language modelling (GPT): predict every next token of a packed block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalLM:
    terms = ("clm",)
    stats = ("clm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(ids[:, :-1])  # (B, T-1, V): the last token has no target inside the block
        keep = mask[:, 1:].bool()  # positions whose next token is real
        logits, targets = logits[keep].float(), ids[:, 1:][keep]
        sums = {"clm": F.cross_entropy(logits, targets, reduction="sum")}
        return sums, {"clm_correct": (logits.argmax(-1) == targets).sum()}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        loss = sums["clm"] / counts["clm"]
        return {
            "clm_loss": loss,
            "clm_accuracy": stats["clm_correct"] / counts["clm"],
            "perplexity": math.exp(min(loss, 50.0)),
            "loss": loss,
        }
