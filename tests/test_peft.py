"""Parameter-efficient methods: no effect at start, merge equality, what trains, AdaLoRA's budget, prefixes."""

from __future__ import annotations

import pytest
import torch

from ptmcli import checkpoint, peft
from ptmcli.distributed import Dist
from ptmcli.models.attention import SelfAttention
from ptmcli.models.bert import build_encoder
from ptmcli.models.heads import TaskModel
from ptmcli.optim import build_optimizer, build_schedule
from ptmcli.peft.adalora import budget
from ptmcli.schema import AdaLoraTransfer, AdapterTransfer, BertArch, LoraTransfer, OptimizerConfig, PrefixTransfer

ARCH = BertArch(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_positions=32,
    dropout=0.0,
    attention_dropout=0.0,
)


def _model(head="sequence", seed=0):
    torch.manual_seed(seed)
    return TaskModel(build_encoder(ARCH, 60), head, 3, dropout=0.0)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return ids, torch.zeros_like(ids), mask


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(*_batch())


@pytest.mark.parametrize(
    "cfg",
    [LoraTransfer(dropout=0.0), LoraTransfer(targets=["qkv", "out", "up", "down"]), AdapterTransfer(bottleneck=8)],
)
def test_fresh_method_leaves_logits_unchanged(cfg):
    model = _model()
    before = _logits(model)
    peft.apply(model, cfg, total_steps=10)
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)


def test_lora_merge_and_unmerge_give_the_same_logits():
    model = _model()
    method = peft.apply(model, LoraTransfer(dropout=0.0, targets=["query", "value", "down"]), 10)
    with torch.no_grad():
        for m in method.low_rank.values():
            for b in m.lora_B:
                b.normal_(std=0.1)
    unmerged = _logits(model)
    assert not torch.allclose(unmerged, _logits(_model()), atol=1e-4)  # the update does something
    method.merge()
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=0)
    method.unmerge()
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (LoraTransfer(), {"lora_A", "lora_B", "head"}),
        (LoraTransfer(bias="all"), {"lora_A", "lora_B", "head", "bias"}),
        (AdaLoraTransfer(), {"lora_A", "lora_B", "lora_E", "head"}),
        (AdapterTransfer(bottleneck=8), {"adapter_down", "adapter_up", "head", "norm"}),
        (PrefixTransfer(num_virtual_tokens=3, projection_hidden=16), {"prefix_encoder", "head"}),
    ],
)
def test_only_the_method_and_head_get_gradients(cfg, expected):
    model = _model()
    peft.apply(model, cfg, 10)
    model.train()
    model(*_batch()).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    for name in trainable:
        assert any(part in name for part in expected), name
    assert not any(
        p.requires_grad
        for n, p in model.encoder.named_parameters()
        if n.endswith("embeddings.word.weight") or n.endswith("qkv.base.weight") or n == "pooler.weight"
    )


def test_adalora_budget_schedule_reaches_target():
    cfg = AdaLoraTransfer(init_r=6, target_r=2, tinit=0.1, tfinal=0.2, delta_t=5)
    n, total = 4, 100
    kept = [budget(step, total, cfg, n)[0] for step in range(1, total + 1)]
    assert kept[0] == 24 and kept[-1] == 8 and kept == sorted(kept, reverse=True)
    model = _model()
    method = peft.apply(model, cfg, total)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    ranks = None
    for step in range(1, total + 1):
        model(*_batch(step)).pow(2).sum().add(method.regularizer()).backward()
        optimizer.step()
        ranks = method.after_update(step) or ranks
        optimizer.zero_grad()
    assert ranks["total_rank"] == cfg.target_r * len(method.allocator.updates) == 8
    assert len(ranks["ranks"]) == 4  # query and value slices of 2 layers


def test_prefix_attention_shapes_and_causality():
    torch.manual_seed(0)
    attention = SelfAttention(16, 4, 0.0).eval()
    P = 3
    prefix_kv = torch.randn(2, 2, 4, P, 4)
    attention.prefix = lambda batch: (prefix_kv[0][:batch], prefix_kv[1][:batch])
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    assert attention(x, mask).shape == (2, 6, 16)  # encoder: padding mask extended over the prefix
    causal = attention(x, None, causal=True)  # decoder: prefix visible to all, future hidden
    changed = x.clone()
    changed[:, 4:] += 1.0
    torch.testing.assert_close(attention(changed, None, causal=True)[:, :4], causal[:, :4])
    attention.prefix = None
    assert not torch.allclose(attention(x, None, causal=True), causal)  # the prefix mattered


def test_prefix_freezes_to_plain_tensors():
    model = _model()
    method = peft.apply(model, PrefixTransfer(num_virtual_tokens=4, projection_hidden=8), 10)
    before = _logits(model)
    method.prefix.freeze()
    assert method.prefix.frozen_states.shape == (4, 2 * 2 * 32) and not hasattr(method.prefix, "mlp")
    torch.testing.assert_close(_logits(model), before)


@pytest.mark.parametrize(
    "cfg",
    [
        LoraTransfer(),
        AdaLoraTransfer(),
        AdapterTransfer(bottleneck=8),
        PrefixTransfer(num_virtual_tokens=3, projection_hidden=16),
    ],
)
def test_save_load_gives_the_same_logits(tmp_path, cfg):
    model = _model()
    peft.apply(model, cfg, 10)
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.05), torch.device("cpu"))
    for step in range(3):
        model.train()
        model(*_batch(step)).pow(2).sum().backward()
        optimizer.step(), optimizer.zero_grad()
    expected = _logits(model)
    keys = peft.trainable_keys(model)
    path = checkpoint.save(
        tmp_path,
        3,
        model,
        optimizer,
        build_schedule(optimizer, OptimizerConfig(), 10),
        torch.amp.GradScaler("cpu", enabled=False),
        {"model": {}},
        Dist(),
        0,
        keys=keys,
    )
    full = sum(p.numel() for p in model.parameters())
    saved = sum(p.numel() for n, p in model.named_parameters() if n in keys)
    assert saved < 0.5 * full
    fresh = _model()  # same base weights (same seed), fresh method
    peft.apply(fresh, cfg, 10)
    checkpoint.load_weights(path, fresh, peft.trainable_keys(fresh))
    torch.testing.assert_close(_logits(fresh), expected)


class _FixedPrefix:
    """A prefix of given keys and values (1, nh, P, hs), as `LayerPrefix` hands a layer its own."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.length = k, v, k.shape[2]

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.expand(batch_size, -1, -1, -1), self.v.expand(batch_size, -1, -1, -1)


def test_t5_prefix_sits_before_the_text_in_encoder_and_decoder():
    """T5's attention adds a bias by relative position; a prefix's keys sit before the text. A one-layer stack with
    the keys and values that tokens Y would have as its prefix gives the text X the states it has after Y in the
    sequence Y + X: in the encoder (padding masked, the prefix visible) and the causal decoder."""
    from ptmcli.models.t5 import build_seq2seq
    from ptmcli.schema import T5Arch

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_layers=1, num_decoder_layers=1, num_heads=4, intermediate_size=64)
    arch = T5Arch(**sizes, dropout=0.0, attention_dropout=0.0)
    model = build_seq2seq(arch, 60).eval()
    P, B, T = 3, 2, 7
    prefix_ids, ids = torch.randint(5, 60, (1, P)), torch.randint(5, 60, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0

    def prefix_of(block: torch.nn.Module) -> _FixedPrefix:
        """The layer's keys and values of the tokens prefix_ids, split into heads."""
        attention, x = block.attention, model.encoder.embeddings(prefix_ids)
        _, k, v = attention.qkv(block.attention_norm(x)).split(arch.hidden_size, dim=2)
        return _FixedPrefix(*(t.view(1, P, arch.num_heads, -1).transpose(1, 2) for t in (k, v)))

    with torch.no_grad():
        whole = torch.cat([prefix_ids.expand(B, -1), ids], 1)
        whole_mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
        memory = model.encoder(whole, None, whole_mask)
        decoded = model.decoder(model.encoder.embeddings(whole), memory, whole_mask.bool()[:, None, None, :])
        for stack in (model.encoder, model.decoder):
            stack.layers[0].attention.prefix = prefix_of(stack.layers[0])
        encoded = model.encoder(ids, None, mask)
        memory_mask = whole_mask.bool()[:, None, None, :]
        with_prefix = model.decoder(model.encoder.embeddings(ids), memory, memory_mask)
    real = mask.bool()
    torch.testing.assert_close(encoded[real], memory[:, P:][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_prefix, decoded[:, P:], atol=1e-5, rtol=1e-5)
