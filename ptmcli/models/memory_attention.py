"""Cross-attention computed in the space of the encoder's states, which are then never projected into keys and values.

Head h's scores are q_h (E W_k,h^T)^T = (q_h W_k,h) E^T and its output is P_h (E W_v,h^T) = (P_h E) W_v,h^T: the
same sums in another order. Projecting the S encoder states into keys and values costs 2 S C^2 multiply-adds an
example; projecting the T queries into the states' space and the weighted states back costs 2 T C^2, and the scores
and weighted sums then run over the full width C for each of the H heads (2 H T S C, against 2 T S C). With few
decoder tokens against many encoder ones that is less work (T5's span corruption, 26 targets for 116 inputs, C = 256,
H = 4: 57 % of the multiply-adds), and nothing of the encoder's length is made but the attention weights, which are
all the backward pass keeps beside its inputs.
"""

from __future__ import annotations

import torch


def cheaper(queries: int, keys: int, width: int, heads: int) -> bool:
    """Whether attending in the states' space takes fewer multiply-adds than projecting keys and values:
    2 T C^2 + 2 H T S C against 2 S C^2 + 2 T S C."""
    return queries * (width + (heads - 1) * keys) < keys * width


def _batch_major(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(H, B*T, C) -> (B, H*T, C): each example's rows of every head together, for a product with its states."""
    heads, rows, width = x.shape
    return x.view(heads, batch, rows // batch, width).transpose(0, 1).reshape(batch, -1, width)


def _head_major(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H*T, C) -> (H, B*T, C): each head's rows of every example together, for a product with its weights."""
    batch, rows, width = x.shape
    return x.view(batch, heads, rows // heads, width).transpose(0, 1).reshape(heads, -1, width)


class MemorySpaceAttention(torch.autograd.Function):
    """(B, T, C) projected queries attending to (B, S, C) encoder states through the (2C, C) key-value projection
    `weight` (keys' rows first, each H heads of C/H rows) -> (B, T, C), the heads merged. `mask`: (B, 1, 1, S)
    boolean, True where a state may be attended to, or None. Keeps the queries, the states and the attention weights;
    the backward pass projects the queries and weighs the states again (two of its ten products)."""

    @staticmethod
    def forward(ctx, query, memory, weight, mask, heads: int, scale: float):
        batch, queries, width = query.shape
        key_weight, value_weight = weight.view(2, heads, width // heads, width).unbind(0)
        per_head = query.reshape(-1, heads, width // heads).transpose(0, 1)  # (H, B*T, C/H)
        keyed = _batch_major(torch.bmm(per_head, key_weight), batch)  # (B, H*T, C)
        scores = torch.bmm(keyed, memory.transpose(1, 2))  # (B, H*T, S)
        if scale != 1.0:
            scores.mul_(scale)
        if mask is not None:
            scores.view(batch, heads, queries, -1).masked_fill_(~mask, float("-inf"))
        weights = scores.softmax(-1)
        weighed = _head_major(torch.bmm(weights, memory), heads)  # (H, B*T, C)
        out = torch.bmm(weighed, value_weight.transpose(1, 2))  # (H, B*T, C/H)
        ctx.save_for_backward(query, memory, weight, weights)
        ctx.heads, ctx.scale = heads, scale
        return out.transpose(0, 1).reshape(batch, queries, width)

    @staticmethod
    def backward(ctx, grad):
        query, memory, weight, weights = ctx.saved_tensors
        heads, scale = ctx.heads, ctx.scale
        batch, queries, width = query.shape
        key_weight, value_weight = weight.view(2, heads, width // heads, width).unbind(0)
        per_head = query.reshape(-1, heads, width // heads).transpose(0, 1)
        grad_out = grad.reshape(-1, heads, width // heads).transpose(0, 1)  # (H, B*T, C/H)
        need_query, need_memory, need_weight = ctx.needs_input_grad[:3]
        grad_value_weight = grad_query = grad_memory = grad_weight = None
        if need_weight:
            weighed = _head_major(torch.bmm(weights, memory), heads)
            grad_value_weight = torch.bmm(grad_out.transpose(1, 2), weighed)  # (H, C/H, C)
        grad_weighed = _batch_major(torch.bmm(grad_out, value_weight), batch)  # (B, H*T, C)
        grad_weights = torch.bmm(grad_weighed, memory.transpose(1, 2))  # (B, H*T, S)
        # softmax's backward: P * (dP - sum(P * dP)); masked weights are 0, so are their scores' gradients
        grad_scores = grad_weights.sub_((grad_weights * weights).sum(-1, keepdim=True)).mul_(weights)
        if scale != 1.0:
            grad_scores.mul_(scale)
        if need_memory:
            keyed = _batch_major(torch.bmm(per_head, key_weight), batch)
            grad_memory = torch.bmm(weights.transpose(1, 2), grad_weighed)  # (B, S, C)
            grad_memory.baddbmm_(grad_scores.transpose(1, 2), keyed)
        if need_query or need_weight:
            grad_keyed = _head_major(torch.bmm(grad_scores, memory), heads)  # (H, B*T, C)
        if need_query:
            grad_query = torch.bmm(grad_keyed, key_weight.transpose(1, 2))  # (H, B*T, C/H)
            grad_query = grad_query.transpose(0, 1).reshape(batch, queries, width)
        if need_weight:
            grad_key_weight = torch.bmm(per_head.transpose(1, 2), grad_keyed)  # (H, C/H, C)
            grad_weight = torch.cat([grad_key_weight.reshape(width, width), grad_value_weight.reshape(width, width)])
        return grad_query, grad_memory, grad_weight, None, None, None
