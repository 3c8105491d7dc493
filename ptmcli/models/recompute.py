"""Layers that recompute a cheap elementwise result in the backward pass instead of keeping it until then.

Left to autograd, down(gelu(up(x))) keeps two (tokens x intermediate) tensors per layer: the GELU's input for
its own derivative and its output for the down projection's weight gradient. They are the largest tensors a
layer keeps (4x the hidden width). `GeluThenLinear` keeps the input alone and recomputes the GELU in the
backward pass, an elementwise op that costs far less than the products beside it. `rms_norm` (T5's norm, and its
module `RMSNorm`) keeps its input and one number per token, where autograd keeps the input and the normalised copy.
For T5 the same is done to the normalised input of each projection (`RMSNormThenLinear`), the attention weights
(`BiasedAttention`) and cross-attention's keys and values (`ProjectedInBackward`), each for one small product more;
in bf16 on a CPU, to any attention's weights without dropout (`RebuiltAttention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptmcli.models.exponential import exp_

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


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x), 1 / rms(x)): the statistic and the division in fp32 (fp64 for fp64), the result in the
    weight's dtype."""
    wide = at_least_fp32(x)
    # not under autocast, which runs vecdot in bf16 on a CPU: the statistic from x rounded, in bf16, and two casts
    with torch.autocast(x.device.type, enabled=False):
        rstd = torch.linalg.vecdot(wide, wide, dim=-1).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
    return (wide * rstd).to(weight.dtype).mul_(weight), rstd


def _rms_norm_backward(grad, x, weight, rstd, normed, need) -> tuple:
    """The gradients of weight * x / rms(x) with respect to (x, weight) where `need` asks; `normed` is x * rstd in
    fp32 at least, which this overwrites."""
    grad_x = grad_weight = None
    if need[0]:
        grad_normed = at_least_fp32(grad * weight)
        with torch.autocast(x.device.type, enabled=False):  # a backward pass run again under autocast: in fp32
            dot = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1)
        # rstd * (grad_normed - normed * mean(grad_normed * normed))
        grad_x = torch.addcmul(grad_normed, normed, dot, value=-1.0 / x.shape[-1]).mul_(rstd).to(x.dtype)
    if need[1]:
        grad_weight = normed.mul_(grad).flatten(0, -2).sum(0).to(weight.dtype)
    return grad_x, grad_weight


class _RMSNorm(torch.autograd.Function):
    """Few passes over the (tokens x width) tensors: the forward's sum of squares and the backward's dot product are
    one `vecdot` each, with no squared or multiplied copy (forward + backward at T5's 3,712 x 256: 2.1-2.3 ms, 3.2 with
    pow / mean and a product for the dot, 4.5-5.2 left to autograd: `python tests/bench/rms_norm.py`)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        normed, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        return (*_rms_norm_backward(grad, x, weight, rstd, at_least_fp32(x) * rstd, ctx.needs_input_grad), None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x), the division in fp32 at least and the result in the weight's dtype (T5's layer norm)."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction and no bias; computed in fp32 at least."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def normed_projection(linear: nn.Module, x: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
    """linear(norm(x)), fused where an `RMSNorm` meets a plain `nn.Linear` (not one LoRA or an adapter wraps), so
    the normalised x is not kept for the backward pass (`RMSNormThenLinear`)."""
    if norm is None:
        return linear(x)
    if isinstance(norm, RMSNorm) and isinstance(linear, nn.Linear):
        return RMSNormThenLinear.apply(x, norm.weight, norm.eps, linear.weight, linear.bias)
    return linear(norm(x))


class RMSNormThenLinear(torch.autograd.Function):
    """F.linear(rms_norm(x, norm_weight, eps), weight, bias), keeping x and one fp32 number per token (what the norm
    keeps anyway) and not the normalised copy, which the projection alone would keep for its weight gradient: the
    backward pass computes it again, one elementwise pass. In T5 every norm feeds one projection (query-key-value,
    cross-attention query, feed-forward up): that copy was 39 MB of the 291 its bench step keeps.

    Under autocast the product runs in the autocast dtype; the backward pass computes the product's gradients in
    that dtype and the norm's in fp32, as autograd through autocast's casts would."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps: float, weight, bias):
        normed, rstd = _rms_norm_forward(x, norm_weight, eps)
        out = F.linear(normed, weight, bias)
        ctx.save_for_backward(x, norm_weight, rstd, weight)
        ctx.compute, ctx.bias_dtype = out.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, rstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        unit = at_least_fp32(x) * rstd
        grad = grad.to(ctx.compute)
        grad_weight = grad_bias = grad_x = grad_norm_weight = None
        if need[3]:  # the normalised input, as the forward pass made it, only for the weight's gradient
            normed = (unit.to(norm_weight.dtype) * norm_weight).to(ctx.compute)
            grad_weight = (grad.flatten(0, -2).T @ normed.flatten(0, -2)).to(weight.dtype)
        if ctx.bias_dtype is not None and need[4]:
            grad_bias = grad.flatten(0, -2).sum(0).to(ctx.bias_dtype)
        if need[0] or need[1]:
            grad_normed = (grad @ weight.to(ctx.compute)).to(norm_weight.dtype)
            grad_x, grad_norm_weight = _rms_norm_backward(grad_normed, x, norm_weight, rstd, unit, need[:2])
        return grad_x, grad_norm_weight, None, grad_weight, grad_bias


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 where it is in a 16-bit float dtype (a contiguous copy), else as it is (fp32, or fp64 under
    gradcheck)."""
    half = x.dtype in (torch.bfloat16, torch.float16)
    return x.to(torch.float32, memory_format=torch.contiguous_format) if half else x


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q @ k^T * scale + bias, (B, nh, T, S), in fp32 at least: from 16-bit q and k upcast. In place after the product,
    which autograd lets be (the product's gradients need its inputs, not its result)."""
    scores = at_least_fp32(q) @ at_least_fp32(k).transpose(-2, -1)
    if scale != 1.0:
        scores.mul_(scale)
    return scores if bias is None else scores.add_(bias)


def _rebuilt_forward(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ v, (B, nh, T, hs) in v's dtype, and each query's log-sum-exp of the scores, from contiguous
    (B, nh, T|S, hs) heads; the weights cast to v's dtype for their product."""
    with torch.autocast(q.device.type, enabled=False):  # the dtypes here are chosen, not autocast's
        scores = _scores(q, k, bias, scale)
        most = scores.amax(-1, keepdim=True)
        weights = scores.softmax(-1)
        del scores
        # the largest weight of a row is exp(max - lse): lse from it, without another pass of exponentials
        lse = weights.amax(-1, keepdim=True).log_().neg_().add_(most)
        return weights.to(v.dtype) @ v, lse


def _rebuilt_backward(q, k, v, bias, lse, scale: float, grad, grad_q, grad_k, grad_v, bias_grad: bool):
    """The gradients of `_rebuilt_forward`'s output with respect to q, k and v, written into grad_q, grad_k and
    grad_v (contiguous, like the heads), from the weights rebuilt; returns the bias's gradient where asked."""
    B, nh = q.shape[:2]
    flat = lambda t: t.view(B * nh, t.shape[-2], t.shape[-1])  # noqa: E731  (bmm's out= takes 3-D)
    with torch.autocast(q.device.type, enabled=False):
        weights = exp_(_scores(q, k, bias, scale).sub_(lse))  # masked keys at -inf: torch's exp_ is 3x slower there
        torch.bmm(flat(weights.to(v.dtype).transpose(-2, -1)), flat(grad), out=flat(grad_v))
        # first the weights' gradient, then in place the scores'
        grad_scores = at_least_fp32(grad) @ at_least_fp32(v).transpose(-2, -1)
        dot = torch.linalg.vecdot(grad_scores, weights, dim=-1).unsqueeze(-1)
        grad_scores.sub_(dot).mul_(weights)
        del weights
        grad_bias = grad_scores.sum_to_size(bias.shape) if bias_grad else None
        grad_scores = grad_scores.to(q.dtype)
        torch.bmm(flat(grad_scores), flat(k), out=flat(grad_q))
        torch.bmm(flat(grad_scores.transpose(-2, -1)), flat(q), out=flat(grad_k))
        if scale != 1.0:
            grad_q.mul_(scale)
            grad_k.mul_(scale)
    return grad_bias


class BiasedAttention(torch.autograd.Function):
    """Multi-head softmax(q @ k^T * scale + bias) @ v from a (B, T, 3C) query-key-value projection and a bias that
    broadcasts to (B, nh, T, T) (T5's relative positions, -inf where masked), merged back to (B, T, C). It keeps q,
    k and v, head by head in one contiguous copy that takes the projection's place, the bias and one log-sum-exp per
    query, and not the (B, nh, T, T) attention weights: the backward pass rebuilds them with one more product of q
    and k, small beside the projections (head size x T multiply-adds a query). T5's bench step kept 20 MB less (of
    252). Head by head and contiguous, no product copies its operands, and the gradients of q, k and v are
    written into one buffer laid out as the projection is, in place of three joined by a copy.

    The weights are the softmax's in the forward pass and exp(scores - log-sum-exp) in the backward, equal to ~1e-6
    relative. A row whose keys are all masked gives NaN, as the softmax does.

    From a bf16 projection (CPU autocast) the products whose results are exponentiated or subtracted from one
    another, the scores and the weights' gradient, run in fp32 on q, k, v and the output's gradient upcast, with the
    bias, softmax and bias gradient in fp32; the other three products run in bf16 on the weights and the scores'
    gradient cast down, as a fused attention kernel does. SDPA, which has no fused CPU kernel for a bias that needs
    a gradient, upcasts q, k, v and every product and casts the bias to bf16: forward + backward at T5's bench
    shapes 17.6-17.9 against 21.0-21.3 ms, the same gradients of q, k and v (`python tests/bench/attention_bias.py
    --bf16`)."""

    @staticmethod
    def forward(ctx, qkv, bias, num_heads: int, scale: float):
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        heads = qkv.view(B, T, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).contiguous()  # (3, B, nh, T, hs)
        out, lse = _rebuilt_forward(*heads, bias, scale)
        ctx.save_for_backward(heads, bias, lse)
        ctx.scale = scale
        return out.transpose(1, 2).reshape(B, T, C)

    @staticmethod
    def backward(ctx, grad):
        heads, bias, lse = ctx.saved_tensors
        _, B, nh, T, hs = heads.shape
        grad = grad.reshape(B, T, nh, hs).transpose(1, 2).to(heads.dtype).contiguous()  # read by two products
        grad_heads = torch.empty_like(heads)
        grad_bias = _rebuilt_backward(*heads, bias, lse, ctx.scale, grad, *grad_heads, ctx.needs_input_grad[1])
        return grad_heads.permute(1, 3, 0, 2, 4).reshape(B, T, 3 * nh * hs), grad_bias, None, None


def fp32_weights_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """`RebuiltAttention`'s computation left to autograd, which keeps the fp32 weights: for a graph whose backward
    pass follows at once (`ProjectedInBackward`'s second pass), where rebuilding them would be work for nothing."""
    with torch.autocast(q.device.type, enabled=False):
        return _scores(q, k, bias, scale).softmax(-1).to(v.dtype) @ v


class RebuiltAttention(torch.autograd.Function):
    """softmax(q @ k^T * scale + bias) @ v of (B, nh, T, hs) queries and (B, nh, S, hs) keys and values, `bias` an
    fp32 tensor that broadcasts to (B, nh, T, S) (-inf where masked) or None: `BiasedAttention`'s computation from
    separate heads (cross-attention, or a mask in place of T5's bias), keeping contiguous q, k and v, the bias and
    one log-sum-exp per query, the weights rebuilt in the backward pass. What `attention` runs on a CPU in bf16
    without dropout, where it keeps no more than SDPA's fused kernel would."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse = _rebuilt_forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, lse = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (q, k, v)]
        need_bias = bias is not None and ctx.needs_input_grad[3]
        grad_bias = _rebuilt_backward(q, k, v, bias, lse, ctx.scale, grad.to(v.dtype).contiguous(), *grads, need_bias)
        return *grads, grad_bias, None


class ProjectedInBackward(torch.autograd.Function):
    """consume(x, F.linear(source, weight, bias)), keeping x, source and the weights, and neither the projection of
    `source` nor what `consume` keeps for its own backward: the backward pass projects and consumes again, with
    gradients on (under the autocast the forward pass ran in). `consume` must draw no random numbers (no dropout):
    the second pass would draw others. For cross-attention, whose keys and values are a projection of the encoder's
    states, which the encoder's backward pass needs anyway."""

    @staticmethod
    def forward(ctx, consume, x, source, weight, bias):
        device = x.device.type
        ctx.consume = consume
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, source, weight, bias)
        return consume(x, F.linear(source, weight, bias))

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad[1:]
        inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need)]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype, enabled=enabled):
            out = ctx.consume(inputs[0], F.linear(*inputs[1:]))
            # a sum whose gradient with respect to `out` is `grad` exactly (times 1): handed `grad` itself,
            # torch.autograd.grad imports sympy for its shape checks (34 MB resident)
            total = (out * grad).sum()
        wanted = [t for t, n in zip(inputs, need) if n]
        grads = iter(torch.autograd.grad(total, wanted) if wanted else ())
        return (None, *(next(grads) if n else None for n in need))
