"""Which rows of a batch a layer runs on: a padded batch's real tokens (`PackedRows`), and the positions whose
final states a pretraining head reads (`QueryRows`). A layer's per-token work (projections, feed-forward, norms)
runs on these rows only; attention sees the (B, T) layout."""

from __future__ import annotations

import torch

ROW_BUCKET = 128


class PackedRows:
    """The real tokens of a padded (B, T) batch as the rows of one (N, C) matrix.

    Everything in a transformer layer but attention works on each token alone (projections, feed-forward,
    norms, dropout, residuals), so a padded batch runs its layers on the N real tokens only, and only attention
    sees the (B, T) layout. BART's denoising blocks and short fine-tuning texts are 15-50 % padding; that share of
    the projections' and feed-forward layers' work (and of what they keep for the backward pass) is skipped."""

    def __init__(self, keep: torch.Tensor):
        self.shape = tuple(keep.shape)
        flat = keep.reshape(-1)
        index = flat.nonzero().squeeze(1)  # (N,) positions in the flattened (B * T)
        # N rounded up to a multiple of ROW_BUCKET with positions that were to be left out: tensors whose sizes
        # change at every step fragment the CPU allocator's heap (peak RSS +400 MB over 40 BART steps, measured),
        # a handful of sizes do not
        extra = min(-len(index) % ROW_BUCKET, flat.numel() - len(index))
        if extra:
            index = torch.cat([index, (~flat).nonzero().squeeze(1)[:extra]]).sort().values
        self.index = index

    @staticmethod
    def of(keep: torch.Tensor | None) -> PackedRows | None:
        """(B, T) 1/0 or bool mask of the tokens to keep -> PackedRows, or None when every row would be kept."""
        if keep is None or bool(keep.all()):
            return None
        rows = PackedRows(keep.bool())
        return rows if len(rows.index) < keep.numel() else None

    # index_select / index_copy rather than advanced indexing: their backward passes (index_add_, index_select) are
    # 2-3x faster on a CPU than indexing's (an accumulating index_put_)
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros where no row was kept (finite: attention multiplies them by 0)."""
        B, T = self.shape
        return _ScatterRows.apply(x, self.index, B * T).view(B, T, -1)


class _ScatterRows(torch.autograd.Function):
    """(N, C) rows into a zero (total, C) matrix at `index`. Torch's out-of-place `index_copy` keeps its whole
    source for the backward pass, which needs only the index: at every QKV projection of a packed batch that was a
    second copy of the projection's output (93 MB of BART's bench step, measured with `profile_step.py --kept`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.new_zeros(total, x.shape[-1]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class QueryRows:
    """The positions whose final states a pretraining head reads (an MLM batch's masked tokens, ~15 %), for the
    encoder's last layer: everything after its keys and values (the queries' attention, the output projection, the
    feed-forward layer, both norms) runs at these rows only, since no later layer reads the other positions. The
    states there equal the full computation's; at 15 % masked, two thirds of the last layer's work is skipped.

    Attention sees the queries as (B, M) slots, M = the most wanted positions in a row; a row's unused slots attend
    like any query and are never read. `wanted` must mark real tokens (of `rows`, when the batch is packed)."""

    def __init__(self, wanted: torch.Tensor, rows: PackedRows | None, slots_per_row: int):
        B, T = wanted.shape
        positions = wanted.reshape(-1).nonzero().squeeze(1)  # (N,) in the flattened (B * T), row-major
        if rows is not None:  # the layer's rows are the packed real tokens: position -> packed row
            packed = torch.full((B * T,), -1, dtype=torch.long, device=wanted.device)
            packed[rows.index] = torch.arange(len(rows.index), device=wanted.device)
            self.index = packed[positions]
        else:
            self.index = positions
        rank = (wanted.cumsum(1) - 1)[wanted]  # each wanted position's place among its row's
        self.slots_per_row = slots_per_row
        self.slot = positions // T * self.slots_per_row + rank  # (N,) into the (B * M) slots
        # each slot's source row; unused slots repeat the first wanted one (attended, never read)
        self.source = self.index[:1].repeat(B * self.slots_per_row).index_copy_(0, self.slot, self.index)

    @staticmethod
    def of(wanted: torch.Tensor | None, rows: PackedRows | None) -> QueryRows | None:
        """None when nothing is wanted. The most positions wanted in a row is read once (a host sync on a GPU)."""
        most = 0 if wanted is None else int(wanted.sum(1).max())
        return QueryRows(wanted, rows, most) if most else None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A layer's input rows ((B, T, C) or packed (N, C)) at the wanted positions: (N_wanted, C)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def slotted(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """The same rows as (B, M, C) attention slots."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.source).view(batch, self.slots_per_row, -1)

    def unslotted(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, C) slots -> (N_wanted, C), in the order of `take`."""
        return y.reshape(-1, y.shape[-1]).index_select(0, self.slot)
