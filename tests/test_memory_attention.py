"""Cross-attention in the encoder states' space (`models.memory_attention`): the projected computation's outputs and
gradients, taken only where it is less work, and less kept for the backward pass."""

import pytest
import torch
import torch.nn.functional as F

from ptmcli.models import attention as attention_module
from ptmcli.models.attention import CrossAttention
from ptmcli.models.memory_attention import MemorySpaceAttention, cheaper
from tests.test_lean_backward import kept_storages, outputs_and_grads, tiny_t5_step

# few queries against many keys, as T5's span corruption (26 targets for 116 inputs at C = 256, H = 4)
B, T, S, C, H = 3, 4, 40, 32, 4


def projected(cross: CrossAttention, x, memory, mask, scale):
    """The straightforward computation: keys and values projected from the memory, then SDPA."""
    heads = lambda t: t.view(t.shape[0], -1, H, C // H).transpose(1, 2)  # noqa: E731
    k, v = cross.kv(memory).split(C, dim=-1)
    y = F.scaled_dot_product_attention(heads(cross.query(x)), heads(k), heads(v), attn_mask=mask, scale=scale)
    return cross.out(y.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("scale", [1.0, None])
def test_attending_in_the_memorys_space_gives_the_projected_outputs_and_gradients(scale):
    torch.manual_seed(0)
    cross = CrossAttention(C, H, 0.0, bias=False, scale=scale, recompute_memory=True)
    x, memory = torch.randn(B, T, C, requires_grad=True), torch.randn(B, S, C, requires_grad=True)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., 30:] = False
    assert cross._in_memory_space(cross.query(x), memory, mask, 0.0)
    params = list(cross.parameters())
    ours = outputs_and_grads(lambda x, m: cross(x, m, mask), [x, memory], params)
    plain = outputs_and_grads(lambda x, m: projected(cross, x, m, mask, scale), [x, memory], params)
    for got, want in zip(ours, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a padded key gets no gradient through the scores
    memory.grad = None
    cross(x, memory, mask)[1].sum().backward()
    assert memory.grad[1, 30:].abs().max() == 0 and memory.grad[1, :30].abs().max() > 0


def test_memory_space_attention_gradients_in_double_and_with_frozen_inputs():
    torch.manual_seed(0)
    double = lambda *shape: torch.randn(*shape, dtype=torch.double, requires_grad=True)  # noqa: E731
    query, memory, weight = double(2, 3, 8), double(2, 5, 8), double(16, 8)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    attend = lambda q, m, w: MemorySpaceAttention.apply(q, m, w, mask, 2, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(attend, (query, memory, weight))
    # a frozen projection (an adapter's base) or memory: the other gradients as before, none for it
    full = torch.autograd.grad(attend(query, memory, weight).sum(), (query, memory, weight))
    frozen = weight.detach()
    grads = torch.autograd.grad(attend(query, memory, frozen).sum(), (query, memory))
    for got, want in zip(grads, full):
        torch.testing.assert_close(got, want)
    (grad_weight,) = torch.autograd.grad(attend(query.detach(), memory.detach(), weight).sum(), (weight,))
    torch.testing.assert_close(grad_weight, full[2])


def test_the_memorys_space_is_taken_only_where_it_is_less_work_and_exact():
    assert cheaper(26, 116, 256, 4)  # T5's bench: 26 targets, 116 inputs
    assert not cheaper(128, 128, 256, 4)  # BART's denoising: as many targets as inputs
    assert not cheaper(5, 7, 32, 4)
    x, memory = torch.randn(B, T, C), torch.randn(B, S, C)
    cross = CrossAttention(C, H, 0.0, bias=False, scale=1.0)
    assert cross._in_memory_space(x, memory, None, 0.0)
    assert not cross._in_memory_space(x, memory, None, 0.1)  # attention dropout
    assert not cross._in_memory_space(x.double(), memory.double(), None, 0.0)
    assert not cross._in_memory_space(x, memory, torch.zeros(B, 1, 1, S), 0.0)  # an additive mask
    with torch.autocast("cpu", torch.bfloat16):
        assert not cross._in_memory_space(x, memory, None, 0.0)
    assert not CrossAttention(C, H, 0.0, bias=True)._in_memory_space(x, memory, None, 0.0)  # BART's biases


def test_attending_in_the_memorys_space_keeps_nothing_the_size_of_the_projected_keys_and_values():
    cross = CrossAttention(C, H, 0.0, bias=False, scale=1.0, recompute_memory=True)
    x, memory = torch.randn(B, T, C, requires_grad=True), torch.randn(B, S, C, requires_grad=True)
    kept = [t for t in kept_storages(lambda: cross(x, memory, None)) if not isinstance(t, torch.nn.Parameter)]
    others = [t.numel() for t in kept if t.untyped_storage().data_ptr() != memory.untyped_storage().data_ptr()]
    assert max(others) < B * S * C  # the weights (B, H*T, S) and the queries; the memory itself, kept anyway


def test_t5_with_few_targets_gets_the_projected_loss_and_gradients(monkeypatch):
    """A T5 step whose decoder attends in the encoder's space (4 targets for 40 inputs): the loss and every gradient
    of the same step with the keys and values projected."""
    _, step = tiny_t5_step(3, 40, 4, 31)
    calls = []
    monkeypatch.setattr(attention_module, "cheaper", lambda *shape: calls.append(shape) or cheaper(*shape))
    ours = step()
    assert calls and all(cheaper(*shape) for shape in calls)
    monkeypatch.setattr(attention_module, "cheaper", lambda *shape: False)
    for got, want in zip(ours, step()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
