"""Masked language modelling, optionally with next-sentence prediction (BERT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.vocab_loss import IGNORE, SHAPE_ROWS, in_cpu_autocast


def whole_buckets_of_rows(positions: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor):
    """(B, T) positions to predict and their (N,) targets, with more unmasked real tokens (not the first of a row,
    at most ceil(extra / B) a row) predicted against IGNORE, so that N is a multiple of SHAPE_ROWS. A CPU's bf16
    products keep a kernel for every shape they meet, megabytes each where the rows are a product's inner size (the
    weight gradients of the last layer and the head, which run at the masked positions only): with the number of
    masked tokens changing every step, BERT-mini's bf16 run grew by ~8 MB a step. The added rows add nothing to the
    loss or the gradients (IGNORE), and a query changes no other position's states."""
    extra = -len(targets) % SHAPE_ROWS
    if not extra:
        return positions, targets
    free = attention_mask.bool() & ~positions
    free[:, 0] = False
    free &= free.cumsum(1) <= -(-extra // positions.shape[0])
    added = free.reshape(-1).nonzero().squeeze(1)[:extra]
    if not len(added):
        return positions, targets
    padded = positions.clone()
    padded.view(-1)[added] = True
    every = torch.full(positions.shape, IGNORE, dtype=targets.dtype, device=targets.device)
    every[positions] = targets
    return padded, every[padded]


def positions_to_predict(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (B, T) masked positions and (N,) targets, padded to whole buckets of rows under a CPU's autocast
    (`whole_buckets_of_rows`), where bf16 products keep a kernel per shape; as they are elsewhere."""
    positions, targets = batch["mlm_positions"], batch["mlm_targets"]
    if in_cpu_autocast(positions):
        return whole_buckets_of_rows(positions, targets, batch["attention_mask"])
    return positions, targets


class MaskedLM:
    def __init__(self, nsp: bool):
        self.nsp = nsp
        self.terms = ("mlm", "nsp") if nsp else ("mlm",)
        self.stats = ("mlm_correct", "nsp_correct") if nsp else ("mlm_correct",)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Returns ({term: summed loss}, {statistic: summed count}) for one micro-batch."""
        positions, targets = positions_to_predict(batch)
        out = model(
            batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], positions, targets,
            predict=not model.training,  # accuracy is read only by evaluation
        )  # fmt: skip
        sums = {"mlm": out["mlm"].loss}
        predicted = out["mlm"].predicted  # IGNORE is never predicted
        stats = {"mlm_correct": (predicted == targets).sum() if predicted is not None else targets.new_zeros(())}
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
