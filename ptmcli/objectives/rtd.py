"""Replaced-token detection (ELECTRA): the generator's masked-LM loss plus lambda times the discriminator's
binary loss over every real token (the paper's lambda = 50)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.objectives.mlm import positions_to_predict


class ReplacedTokenDetection:
    terms = ("mlm", "rtd")
    stats = ("mlm_correct", "rtd_correct", "replaced", "flagged", "flagged_replaced")

    def __init__(self, rtd_weight: float):
        self.term_weights = {"rtd": rtd_weight}  # the loop weights the per-token means of the terms by these

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        positions, targets = positions_to_predict(batch)  # the generator's, as MaskedLM's
        out = model(
            batch["input_ids"],
            batch["token_type_ids"],
            batch["attention_mask"],
            positions,
            targets,
            predict=not model.training,
        )
        real = batch["attention_mask"].bool()
        rtd_logits, replaced = out["rtd_logits"][real].float(), out["replaced"][real]
        flagged = rtd_logits > 0
        sums = {
            "mlm": out["mlm_loss"],
            "rtd": F.binary_cross_entropy_with_logits(rtd_logits, replaced.float(), reduction="sum"),
        }
        stats = {
            "mlm_correct": (
                (out["mlm_predicted"] == targets).sum()  # IGNORE is never predicted
                if out["mlm_predicted"] is not None
                else torch.zeros((), device=replaced.device)  # read only by evaluation
            ),
            "rtd_correct": (flagged == replaced).sum(),
            "replaced": replaced.sum(),
            "flagged": flagged.sum(),
            "flagged_replaced": (flagged & replaced).sum(),
        }
        return sums, stats

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        mlm, rtd = sums["mlm"] / counts["mlm"], sums["rtd"] / counts["rtd"]
        return {
            "mlm_loss": mlm,
            "mlm_accuracy": stats["mlm_correct"] / counts["mlm"],
            "perplexity": math.exp(min(mlm, 50.0)),
            "rtd_loss": rtd,
            "rtd_accuracy": stats["rtd_correct"] / counts["rtd"],
            "replaced_fraction": stats["replaced"] / counts["rtd"],
            "rtd_precision": stats["flagged_replaced"] / max(stats["flagged"], 1),
            "rtd_recall": stats["flagged_replaced"] / max(stats["replaced"], 1),
            "loss": mlm + self.term_weights["rtd"] * rtd,
        }
