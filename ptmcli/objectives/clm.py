"""Causal language modelling (GPT): predict every next token of a packed block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class CausalLM:
    terms = ("clm",)
    stats = ("clm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(ids[:, :-1])  # (B, T-1, V): the last token has no target inside the block
        # padding is ignored by index, not gathered out: a (tokens x vocabulary) copy forward and a scatter backward
        # cost more than the few padded positions of packed blocks
        targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), IGNORE)
        flat = logits.reshape(-1, logits.shape[-1]).float()  # the softmax in fp32 under autocast
        sums = {"clm": F.cross_entropy(flat, targets.reshape(-1), reduction="sum", ignore_index=IGNORE)}
        if model.training:  # the accuracy statistic is read only by evaluation: no argmax over V per training step
            return sums, {"clm_correct": torch.zeros((), device=ids.device)}
        with torch.no_grad():
            correct = ((flat.argmax(-1) == targets.reshape(-1)) & (targets.reshape(-1) != IGNORE)).sum()
        return sums, {"clm_correct": correct}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        loss = sums["clm"] / counts["clm"]
        return {
            "clm_loss": loss,
            "clm_accuracy": stats["clm_correct"] / counts["clm"],
            "perplexity": math.exp(min(loss, 50.0)),
            "loss": loss,
        }
