"""What the layers keep for the backward pass (peak memory, issue 20): the same outputs and gradients as the
straightforward computation, with fewer or smaller tensors kept between the passes."""

import pytest
import torch

from ptmcli.models.dropout import dropout, dropout_matmul
from ptmcli.models.layers import FeedForward
from ptmcli.models.recompute import rms_norm
from ptmcli.models.xlnet import TwoStreamAttention, relative_shift, relative_sinusoid


def kept_storages(fn, *args) -> list[torch.Tensor]:
    """The distinct tensors autograd keeps for the backward pass of fn(*args) (parameters and inputs included)."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return list(kept.values())


def outputs_and_grads(fn, inputs, params) -> list[torch.Tensor]:
    for t in (*inputs, *params):
        t.grad = None
    out = fn(*inputs)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out, *(t.grad for t in (*inputs, *params))]


@pytest.mark.parametrize("activation", ["gelu", "gelu-tanh"])
@pytest.mark.parametrize("autocast", [False, True])
def test_feed_forward_keeps_one_wide_tensor_with_the_gradients_of_the_plain_computation(activation, autocast):
    torch.manual_seed(0)
    ffn = FeedForward(16, 64, activation=activation)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def plain(x):
        return ffn.down(ffn.activation(ffn.up(x)))

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return outputs_and_grads(fn, [x], list(ffn.parameters()))

    for ours, ref in zip(run(ffn), run(plain)):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    wide = [t for t in kept_storages(ffn, x) if t.numel() == 3 * 5 * 64]
    assert len(wide) == 1  # the activation's input; the plain computation keeps its output too
    assert len([t for t in kept_storages(plain, x) if t.numel() == 3 * 5 * 64]) == 2


def test_feed_forward_with_frozen_weights_still_passes_the_input_gradient():
    ffn = FeedForward(16, 64).requires_grad_(False)
    x = torch.randn(2, 3, 16, requires_grad=True)
    ffn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in ffn.parameters())


def test_dropout_matmul_equals_dropout_then_product_and_keeps_no_dropped_copy():
    weights = torch.randn(2, 4, 128, 128).softmax(-1).requires_grad_()  # above dropout.SMALL units
    values = torch.randn(2, 4, 128, 16, requires_grad=True)
    results = []
    for fn in (lambda w, v: dropout(w, 0.1) @ v, lambda w, v: dropout_matmul(w, v, 0.1)):
        torch.manual_seed(1)  # the same seed, so the same mask
        results.append(outputs_and_grads(fn, [weights, values], []))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    kept = kept_storages(lambda w, v: dropout_matmul(w, v, 0.1), weights, values)
    assert {t.untyped_storage().data_ptr() for t in kept} == {
        weights.untyped_storage().data_ptr(),
        values.untyped_storage().data_ptr(),
    }


@pytest.mark.parametrize("T", [1, 2, 9])
def test_relative_shift_picks_the_score_for_each_distance(T):
    by_distance = torch.randn(2, 3, T, 2 * T - 1)
    i = torch.arange(T)
    column = (T - 1) - (i[:, None] - i[None, :])  # the column of distance i - j
    torch.testing.assert_close(relative_shift(by_distance), by_distance.gather(-1, column.expand(2, 3, T, T)))


def test_a_query_with_nothing_to_see_gets_zeros_and_finite_gradients():
    """The first token in the factorisation order sees nothing in the query stream: its attention output is
    zero (not a uniform average over tokens it may not see) and no NaN reaches the gradients."""
    torch.manual_seed(0)
    T = 6
    attention = TwoStreamAttention(16, 2, 0.0)
    h, g = (torch.randn(1, T, 16, requires_grad=True) for _ in range(2))
    rank = torch.randperm(T)[None]
    content = (rank[:, None, :] <= rank[:, :, None])[:, None]
    query = (rank[:, None, :] < rank[:, :, None])[:, None]
    _, g_out = attention(h, g, content, query, relative_sinusoid(T, 16, h.device))
    first = int(rank[0].argmin())
    assert torch.equal(g_out[0, first], torch.zeros(16))  # XLNet's output projection has no bias
    assert (g_out[0].abs().sum(-1) > 0).sum() == T - 1  # every other query attends to something
    g_out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (h, g, *attention.parameters()) if t.grad is not None)


def test_rms_norm_keeps_its_input_and_one_number_per_token_with_the_plain_gradients():
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 16, requires_grad=True), (1 + 0.1 * torch.randn(16)).requires_grad_()

    def plain(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    results = [
        outputs_and_grads(lambda x: fn(x, weight), [x], [weight]) for fn in (lambda x, w: rms_norm(x, w, 1e-6), plain)
    ]
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    kept = kept_storages(lambda x: rms_norm(x, weight, 1e-6), x)
    assert sorted(t.numel() for t in kept) == [15, 16, 3 * 5 * 16]  # 1 / rms per token, the weight, the input
