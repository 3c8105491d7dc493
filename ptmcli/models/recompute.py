"""Layers that recompute a cheap elementwise result in the backward pass instead of keeping it until then.

Left to autograd, down(gelu(up(x))) keeps two (tokens x intermediate) tensors per layer: the GELU's input for
its own derivative and its output for the down projection's weight gradient. They are the largest tensors a
layer keeps (4x the hidden width). `GeluThenLinear` keeps the input alone and recomputes the GELU in the
backward pass, an elementwise op that costs far less than the products beside it. `rms_norm` (T5's norm) keeps
its input and one number per token, where autograd keeps the input and the normalised copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the activations whose input is worth keeping instead of their output, with F.gelu's name for each; not ReLU,
# whose derivative needs only its output, which the down projection keeps anyway
GELU_APPROXIMATION = {"gelu": "none", "gelu-tanh": "tanh"}


class GeluThenLinear(torch.autograd.Function):
    """F.linear(gelu(pre), weight, bias), keeping `pre` and not gelu(pre) for the backward pass.

    Under autocast the product runs in the autocast dtype; the backward pass, which autocast does not cover,
    computes in `pre`'s dtype and returns the weight's gradients in the weight's own dtype, as autograd through
    autocast's cast would."""

    @staticmethod
    def forward(ctx, pre, weight, bias, approximate: str):
        ctx.save_for_backward(pre, weight)
        ctx.approximate, ctx.bias_dtype = approximate, None if bias is None else bias.dtype
        return F.linear(F.gelu(pre, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        pre, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (*_gelu_then_linear_backward(grad, pre, weight, ctx.bias_dtype, ctx.approximate, need[:3]), None)


def _gelu_then_linear_backward(grad, pre, weight, bias_dtype, approximate: str, need) -> tuple:
    """The gradients of F.linear(gelu(pre), weight, bias) with respect to (pre, weight, bias) where `need` asks,
    computed in `pre`'s dtype, the GELU recomputed from `pre`."""
    grad = grad.to(pre.dtype)
    grad_pre = grad_weight = grad_bias = None
    # one (tokens x intermediate) buffer serves as the recomputed activation and then as its gradient: a fresh
    # 16 MB tensor per layer costs page faults comparable to the GELU itself
    buffer = F.gelu(pre, approximate=approximate)
    if need[1]:
        grad_weight = (grad.flatten(0, -2).T @ buffer.flatten(0, -2)).to(weight.dtype)
    if bias_dtype is not None and need[2]:
        grad_bias = grad.flatten(0, -2).sum(0).to(bias_dtype)
    if need[0]:
        grad_act = torch.matmul(grad, weight.to(pre.dtype), out=buffer)
        grad_pre = torch.ops.aten.gelu_backward.grad_input(grad_act, pre, approximate=approximate, grad_input=buffer)
    return grad_pre, grad_weight, grad_bias


class UpGeluDown(torch.autograd.Function):
    """F.linear(gelu(F.linear(x, up_weight, up_bias)), down_weight, down_bias), keeping only `x` (which the up
    projection's weight gradient needs anyway): the up projection is recomputed in the backward pass, one product
    more of the feed-forward's six, and no (tokens x intermediate) tensor is kept at all. For XLNet, whose two
    streams run the feed-forward twice per layer.

    Under autocast both products run in the autocast dtype; the backward pass recomputes in the dtype the forward
    computed in (the same product on the same inputs) and returns each gradient in its tensor's own dtype."""

    @staticmethod
    def forward(ctx, x, up_weight, up_bias, down_weight, down_bias, approximate: str):
        pre = F.linear(x, up_weight, up_bias)
        ctx.save_for_backward(x, up_weight, up_bias, down_weight)
        ctx.approximate, ctx.compute = approximate, pre.dtype
        ctx.down_bias_dtype = None if down_bias is None else down_bias.dtype
        return F.linear(F.gelu(pre, approximate=approximate), down_weight, down_bias)

    @staticmethod
    def backward(ctx, grad):
        x, up_weight, up_bias, down_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        x_c, up_c = x.to(ctx.compute), up_weight.to(ctx.compute)
        pre = F.linear(x_c, up_c, None if up_bias is None else up_bias.to(ctx.compute))
        grad_pre, grad_down, grad_down_bias = _gelu_then_linear_backward(
            grad, pre, down_weight, ctx.down_bias_dtype, ctx.approximate, (any(need[:3]), *need[3:5])
        )
        grad_x = grad_up = grad_up_bias = None
        if need[0]:
            grad_x = (grad_pre @ up_c).to(x.dtype)
        if need[1]:
            grad_up = (grad_pre.flatten(0, -2).T @ x_c.flatten(0, -2)).to(up_weight.dtype)
        if up_bias is not None and need[2]:
            grad_up_bias = grad_pre.flatten(0, -2).sum(0).to(up_bias.dtype)
        return grad_x, grad_up, grad_up_bias, grad_down, grad_down_bias, None


class _RMSNorm(torch.autograd.Function):
    """Few passes over the (tokens x width) tensors: the forward's sum of squares and the backward's dot product are
    one `vecdot` each, with no squared or multiplied copy (forward + backward at T5's 3,712 x 256: 2.1-2.3 ms, 3.2 with
    pow / mean and a product for the dot, 4.5-5.2 left to autograd: `python tests/bench/rms_norm.py`)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        wide = x.float()
        rstd = torch.linalg.vecdot(wide, wide, dim=-1).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()  # fp32
        ctx.save_for_backward(x, weight, rstd)
        return (wide * rstd).to(weight.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).float()
            dot = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1)
            # rstd * (grad_normed - normed * mean(grad_normed * normed))
            grad_x = torch.addcmul(grad_normed, normed, dot, value=-1.0 / x.shape[-1]).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = normed.mul_(grad).flatten(0, -2).sum(0).to(weight.dtype)  # normed is not read after this
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), the division in fp32 and the result in the weight's dtype (T5's layer norm)."""
    return _RMSNorm.apply(x, weight, eps)
