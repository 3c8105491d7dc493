"""Cheap CPU dropout (models/dropout.py) and attention written out around it (models/attention.attention)."""

import pytest
import torch
import torch.nn.functional as F

from ptmcli.models.attention import attention
from ptmcli.models.dropout import Dropout, dropout


def test_dropout_drops_the_share_asked_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(32, 128, 256)
    for p in (0.1, 0.5):
        y = dropout(x, p)
        dropped = (y == 0).float().mean().item()
        assert abs(dropped - p) < 0.003  # 1M units: the share's standard error is 0.0003-0.0005
        assert torch.all(y[y != 0] == 65536 / (65536 - round(p * 65536)))  # this path's rounding, not torch's
        assert abs(y.mean().item() - 1.0) < 0.005
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x


def test_dropout_masks_follow_torch_seed_and_the_gradient_is_the_same_mask():
    x = torch.randn(3, 131, 171, requires_grad=True)  # 67,203 units: not a multiple of 4, above `SMALL`
    torch.manual_seed(5)
    y = dropout(x, 0.2)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.2), y)
    assert not torch.equal(dropout(x, 0.2), y)  # the next call draws a new mask
    grad = torch.randn_like(y)
    y.backward(grad)
    scale = torch.where(y != 0, y / x, torch.zeros(()))  # 1 / kept share where kept, 0 where dropped
    torch.testing.assert_close(x.grad, grad * scale)


def test_the_module_is_an_nn_dropout_and_is_off_in_eval():
    layer = Dropout(0.1)
    assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.1
    x = torch.randn(8, 16, 1024)
    assert torch.equal(layer.eval()(x), x)
    assert not torch.equal(layer.train()(x), x)


@pytest.mark.parametrize("kind", ["bool", "bias", "causal", "none"])
def test_written_out_attention_equals_sdpa(kind):
    """With dropout too rare to drop anything, the written-out path (taken whenever dropout_p > 0 on a CPU) gives
    SDPA's outputs and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, requires_grad=True) for _ in range(3))
    mask = {
        "bool": torch.tensor([[1] * 9, [1] * 6 + [0] * 3]).bool()[:, None, None, :],
        "bias": torch.randn(1, 4, 9, 9),
        "causal": None,
        "none": None,
    }[kind]
    causal = kind == "causal"
    ours = attention(q, k, v, mask, 1e-9, causal, 0.5)
    ours_grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.5)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_dropout_averages_to_attention_without_it():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4).expand(4000, -1, -1, -1) for _ in range(3))  # a mask of its own per copy
    ref = F.scaled_dot_product_attention(q[:1], k[:1], v[:1])
    mean = attention(q, k, v, None, 0.3, False, None).mean(0, keepdim=True)
    torch.testing.assert_close(mean, ref, atol=0.05, rtol=0)
