"""Causal language modelling (GPT): predict every next token of a packed block."""

from __future__ import annotations

import math

import torch
from torch import nn

from ptmcli.models.vocab_loss import IGNORE


class CausalLM:
    terms = ("clm",)
    stats = ("clm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # padding is ignored by index, not gathered out; the model projects onto the vocabulary chunk by chunk
        targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), IGNORE)
        # the last token has no target inside the block; accuracy is read only by evaluation
        out = model(ids[:, :-1], targets=targets, predict=not model.training)
        if out.predicted is None:
            return {"clm": out.loss}, {"clm_correct": torch.zeros((), device=ids.device)}
        return {"clm": out.loss}, {"clm_correct": (out.predicted == targets.reshape(-1)).sum()}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        loss = sums["clm"] / counts["clm"]
        return {
            "clm_loss": loss,
            "clm_accuracy": stats["clm_correct"] / counts["clm"],
            "perplexity": math.exp(min(loss, 50.0)),
            "loss": loss,
        }
