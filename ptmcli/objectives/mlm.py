"""Masked language modelling, optionally with next-sentence prediction (BERT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.vocab_loss import correct


class MaskedLM:
    def __init__(self, nsp: bool):
        self.nsp = nsp
        self.terms = ("mlm", "nsp") if nsp else ("mlm",)
        self.stats = ("mlm_correct", "nsp_correct") if nsp else ("mlm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Returns ({term: summed loss}, {statistic: summed count}) for one micro-batch."""
        targets = batch["mlm_targets"]  # (N,), N = masked positions
        out = model(
            batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_positions"], targets,
            predict=not model.training,  # accuracy is read only by evaluation
        )  # fmt: skip
        sums = {"mlm": out["mlm"].loss}
        stats = {"mlm_correct": correct(out["mlm"], targets)}
        if self.nsp:
            nsp_logits = out["nsp_logits"].float()  # (B, 2)
            sums["nsp"] = F.cross_entropy(nsp_logits, batch["nsp_labels"], reduction="sum")
            stats["nsp_correct"] = (nsp_logits.argmax(-1) == batch["nsp_labels"]).sum()
        return sums, stats

    def metrics(self, sums: dict[str, float], counts: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
        """Validation metrics from totals over the whole validation pass."""
        mlm_loss = sums["mlm"] / counts["mlm"]
        out = {
            "mlm_loss": mlm_loss,
            "mlm_accuracy": stats["mlm_correct"] / counts["mlm"],
            "perplexity": math.exp(min(mlm_loss, 50.0)),
        }
        if self.nsp:
            out["nsp_loss"] = sums["nsp"] / counts["nsp"]
            out["nsp_accuracy"] = stats["nsp_correct"] / counts["nsp"]
        out["loss"] = sum(out[f"{t}_loss"] for t in self.terms)
        return out
