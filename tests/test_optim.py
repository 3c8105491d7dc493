"""Learning-rate schedules, weight-decay groups and the Adafactor lr caution, against hand-computed values; the fused
AdamW a CPU run steps with."""

from __future__ import annotations

import subprocess
import sys
from copy import deepcopy

import pytest
import torch
from torch import nn

from ptmcli.optim import build_optimizer, build_schedule, lr_caution, lr_factor, param_groups
from ptmcli.schema import OptimizerConfig


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("linear", 0, 0.25),  # warmup: (step + 1) / 4
        ("linear", 3, 1.0),
        ("linear", 4, 1.0),  # decay starts at the peak
        ("linear", 8, 0.5),  # halfway through the 8 steps after warmup
        ("linear", 12, 0.0),
        ("cosine", 8, 0.5),
        ("cosine", 6, 0.5 * (1 + 2**-0.5)),  # a quarter of the way: (1 + cos(pi / 4)) / 2
        ("constant", 11, 1.0),
    ],
)
def test_warmup_then_decay(schedule, step, expected):
    cfg = OptimizerConfig(schedule=schedule, warmup_steps=4)
    assert lr_factor(step, cfg, max_steps=12) == pytest.approx(expected)


def test_decay_stops_at_the_floor_and_warmup_ratio_counts_steps():
    cfg = OptimizerConfig(warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, max_steps=100) == pytest.approx(0.1)  # 10 warmup steps
    assert lr_factor(55, cfg, max_steps=100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg, max_steps=100) == pytest.approx(0.1)


def test_only_matrices_decay_and_tied_weights_appear_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 10))
    model[2].weight = model[0].weight  # tied output projection
    groups = {g["weight_decay"]: g for g in param_groups(model, OptimizerConfig(weight_decay=0.01, lr=1e-3))}
    assert [p.shape for p in groups[0.01]["params"]] == [(10, 4)]
    assert sorted(p.numel() for p in groups[0.0]["params"]) == [4, 4, 10]  # LayerNorm weight and bias, Linear bias


def test_an_adamw_sized_lr_for_adafactor_gets_a_caution():
    assert "optimizer.lr=0.0001" in lr_caution(OptimizerConfig(name="adafactor", lr=1e-4))
    assert lr_caution(OptimizerConfig(name="adafactor", lr=1e-2)) is None
    assert lr_caution(OptimizerConfig(name="adamw", lr=1e-4)) is None


def test_layer_decay_scales_each_layer_and_puts_electras_embedding_projection_with_the_embeddings():
    from ptmcli.architectures import ElectraArch
    from ptmcli.finetune import layer_lr_scale
    from ptmcli.models.electra import build_encoder
    from ptmcli.models.heads import HEADS, TaskModel

    arch = ElectraArch(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, embedding_size=16)
    model = TaskModel(build_encoder(arch, 50), HEADS["text-cls"], 3, 0.1)
    groups = param_groups(model, OptimizerConfig(lr=1.0), layer_lr_scale(3, 0.5))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["encoder.embeddings.word.weight"])] == 0.5**4
    assert lr_of[id(named["encoder.projection.weight"])] == 0.5**4  # below layer 0, as the embeddings
    assert lr_of[id(named["encoder.layers.0.attention.qkv.weight"])] == 0.5**3
    assert lr_of[id(named["encoder.layers.2.attention.qkv.weight"])] == 0.5
    assert {lr_of[id(p)] for n, p in named.items() if not n.startswith("encoder.")} == {1.0}  # the head


def test_adamw_is_fused_on_a_cpu_and_takes_up_a_state_saved_by_the_foreach_path():
    """`fused: auto` steps with torch's fused kernel on a CPU too; runs saved before it did (the foreach path's
    state) resume under it exactly as the foreach path would have continued them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    inputs = torch.randint(0, 10, (6,))
    saved = build_optimizer(model, OptimizerConfig(fused="off"), torch.device("cpu"))
    model(inputs).square().sum().backward()
    saved.step()
    continued = {}
    for fused in ("off", "auto"):
        replica = deepcopy(model)
        optimizer = build_optimizer(replica, OptimizerConfig(fused=fused), torch.device("cpu"))
        optimizer.load_state_dict(deepcopy(saved.state_dict()))
        assert optimizer.defaults["fused"] is (True if fused == "auto" else None)
        for _ in range(3):
            optimizer.zero_grad()
            replica(inputs).square().sum().backward()
            optimizer.step()
        continued[fused] = torch.cat([p.detach().flatten() for p in replica.parameters()])
    torch.testing.assert_close(continued["auto"], continued["off"], rtol=0, atol=1e-6)
    assert not torch.equal(continued["auto"], torch.cat([p.detach().flatten() for p in model.parameters()]))


# a fresh process: the test process has imported torch's compiler long before
COMPILER_FREE = """
import sys, torch
from torch import nn
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.optim import build_optimizer, build_schedule
from ptmcli.parallel import is_sharded
from ptmcli.schema import ObjectiveConfig, OptimizerConfig, T5Arch
arch = T5Arch(hidden_size=32, num_layers=1, num_decoder_layers=1, num_heads=2, intermediate_size=64, dropout=0.0,
              attention_dropout=0.0)
model = PRETRAINING_MODELS["t5"](arch, 50, ObjectiveConfig(name="span-corruption"))
ids = torch.randint(0, 50, (2, 7))
for name in ("adamw", "adafactor"):
    cfg = OptimizerConfig(name=name)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    schedule = build_schedule(optimizer, cfg, 10)
    model(ids, None, ids[:, :4], [ids[:, 1:5]])[0].loss.backward()
    assert not is_sharded(model)
    optimizer.step(), schedule.step(), optimizer.zero_grad()
    optimizer.load_state_dict(optimizer.state_dict())
print(" ".join(m for m in ("torch._dynamo", "sympy", "torch.distributed.fsdp") if m in sys.modules) or "none")
"""


def test_a_t5_step_with_either_optimizer_imports_none_of_torchs_compiler():
    """torch's optimizer methods import torch._dynamo at their first call (with sympy and more: 71 MB resident);
    ptm's optimizers call the same methods unwrapped. A T5 step (its rebuilt attention weights, keys and values
    projected again), AdamW's and Adafactor's step, schedule, state saved and loaded, and the FSDP check import
    neither torch's compiler, sympy nor FSDP."""
    out = subprocess.check_output([sys.executable, "-c", COMPILER_FREE], text=True, timeout=120)
    assert out.split() == ["none"]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_ptms_optimizers_step_exactly_as_torchs(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    replica, inputs = deepcopy(model), torch.randint(0, 10, (6,))
    cfg = OptimizerConfig(name=name, fused="off")
    ours = build_optimizer(model, cfg, torch.device("cpu"))
    settings = dict(betas=tuple(cfg.betas), eps=cfg.eps) if name == "adamw" else {}
    theirs = getattr(torch.optim, type(ours).__name__)(param_groups(replica, cfg), lr=cfg.lr, **settings)
    for optimizer, net in ((ours, model), (theirs, replica)):
        schedule = build_schedule(optimizer, cfg, 10)
        for _ in range(3):
            optimizer.zero_grad()
            net(inputs).square().sum().backward()
            optimizer.step()
            schedule.step()
    for a, b in zip(model.parameters(), replica.parameters()):
        assert torch.equal(a, b)
    assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()
