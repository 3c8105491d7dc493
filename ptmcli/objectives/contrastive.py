"""Contrastive sentence objectives (SimCSE, Gao et al., 2021).

Unsupervised: every text of the batch is encoded twice in one forward; the two dropout masks make two views,
and each first view must pick its own second view out of all second views of the step (in-batch negatives),
by cosine similarity over a temperature. Under data parallelism the second views of every process are
gathered with their gradients, so the negatives are those of the global batch, as the paper's large-batch
results need, and the summed loss is that of one big batch. Validation (no dropout) encodes each text once and
scores how well the texts of a batch are told apart from each other.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-sized row blocks whose backward hands each process the summed gradient of its block."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        blocks = [torch.empty_like(z) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(blocks, z.contiguous())
        ctx.rows, ctx.rank = z.shape[0], torch_dist.get_rank()
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)  # every process's loss reaches every block
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gathered(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of every process, concatenated in rank order, differentiable; this process's first row there)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return z, 0
    # every process serves the same number of rows per micro-batch (BatchOrder), as all_gather needs
    return _GatherRows.apply(z), torch_dist.get_rank() * z.shape[0]


class Contrastive:
    terms = ("contrastive",)
    stats = ("contrastive_correct",)

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, model: nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        inputs = [batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")]
        if model.training:
            vectors = model(*(torch.cat([x, x]) for x in inputs)).float()
            first, second = F.normalize(vectors, dim=-1).chunk(2)
            candidates, offset = gathered(second)
        else:  # no dropout, so one view; processes may evaluate different numbers of batches: nothing is gathered
            first = F.normalize(model(*inputs).float(), dim=-1)
            candidates, offset = first, 0
        similarity = first @ candidates.t() / self.temperature  # (B, global B)
        targets = torch.arange(first.shape[0], device=first.device) + offset
        loss = F.cross_entropy(similarity, targets, reduction="sum")
        return {"contrastive": loss}, {"contrastive_correct": (similarity.argmax(-1) == targets).sum()}

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        loss = sums["contrastive"] / counts["contrastive"]
        # the share of texts whose own second view is the most similar of the batch's second views
        accuracy = stats["contrastive_correct"] / counts["contrastive"]
        return {"contrastive_loss": loss, "contrastive_accuracy": accuracy, "loss": loss}
