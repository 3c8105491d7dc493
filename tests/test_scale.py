"""Trading compute for memory and compiling: activation checkpointing keeps losses and gradients and keeps far
fewer tensors for backward, in every family; a compiled run trains like an eager one (slow: compiling on this CPU
takes a minute)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ptmcli import parallel
from ptmcli.compose import checked, parse
from ptmcli.distributed import Dist
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.objectives import OBJECTIVES
from ptmcli.pretrain import make_examples, prepare_chunks
from tests.conftest import TINY, read_metrics, run_ptm

SMALL = ["model.num_layers=2", "data.max_seq_len=64", "data.vocab_size=2000", "data.max_train_samples=50"]
FAMILIES = {
    "bert": TINY,
    "gpt": ["conf=gpt-mini", "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128", *SMALL],
    "t5": ["conf=t5-mini", "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128", *SMALL],
    "xlnet": ["conf=xlnet-mini", "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128", *SMALL],
}


def _saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for backward while `run` runs."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_keeps_the_numbers_and_drops_the_activations(family):
    cfg = checked(parse("pretrain", [*FAMILIES[family], "model.dropout=0.1"]))[1]
    corpus = prepare_chunks(cfg, Dist())
    batch = make_examples(cfg, corpus.chunks["train"], corpus.tokenizer).batch(list(range(8)), 0)
    objective = OBJECTIVES[cfg.objective.name](cfg.objective)
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = PRETRAINING_MODELS[cfg.model.family](cfg.model, corpus.tokenizer.get_vocab_size(), cfg.objective)
        if checkpointed:
            assert parallel.checkpoint_activations(model) == len(parallel.blocks(model)) >= 2
        torch.manual_seed(1)  # the same dropout masks, drawn again when a block is recomputed
        outcome = {}

        def step():
            sums, _ = objective(model, batch)
            loss = sum(sums.values())
            loss.backward()
            outcome["loss"] = loss.item()

        outcome["kept"] = _saved_bytes(step)
        outcome["grads"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append(outcome)
    plain, recomputed = runs
    assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert recomputed["grads"].keys() == plain["grads"].keys()
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(recomputed["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert recomputed["kept"] < 0.5 * plain["kept"], (plain["kept"], recomputed["kept"])


@pytest.mark.slow
def test_a_compiled_run_trains_like_an_eager_one_and_resumes(cache_env, tmp_path):
    """hardware.compile=true: the same losses as eager (to 1e-5, dropout off), checkpoints with the same keys (no
    `_orig_mod.`), the compile time logged, a resumed compiled run continuing exactly, and generation working."""
    gpt = [
        *FAMILIES["gpt"],
        "model.dropout=0",
        "model.attention_dropout=0",
        "trainer.batch_size=8",
        "trainer.log_every=1",
        "trainer.curves=false",
    ]
    steps = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_every=3", "trainer.eval_batches=2"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_ptm(["pretrain", *gpt, *steps, f"hydra.run.dir={eager}"], cache_env)
    proc = run_ptm(["pretrain", *gpt, *steps, "hardware.compile=true", f"hydra.run.dir={compiled}"], cache_env)
    assert "torch.compile: first step" in proc.stderr
    a, b = read_metrics(eager), read_metrics(compiled)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    assert any("compile_s" in r for r in b)

    def keys(run):
        with safe_open(str(run / "checkpoints" / "step-6" / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(compiled) == keys(eager) and not any("_orig_mod" in k for k in keys(compiled))
    run_ptm(["pretrain", *gpt, *steps, "hardware.compile=true", f"resume={compiled}/checkpoints/step-3"], cache_env)
    after = read_metrics(compiled)
    for x, y in zip(a, after):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    out = run_ptm(["generate", f"run={compiled}", "prompt=The government said", "max_new_tokens=5"], cache_env)
    assert out.stdout.strip()


def _compiled_by_ptm(device: str) -> torch.nn.Module:
    """A tiny model as ptm's loop wraps it with hardware.compile=true (compiled lazily: nothing runs here)."""
    from ptmcli.hardware import Hardware

    wrapped = parallel.wrap(
        torch.nn.Linear(2, 2), Hardware(torch.device(device), torch.float32), Dist(), "ddp", True, False
    )
    assert hasattr(wrapped, "_orig_mod")
    return wrapped


def test_compiling_for_cuda_turns_inductor_mix_order_reduction_off(monkeypatch):
    """A precaution against inductor's silent wrong gradients (pytorch/pytorch#193061): off when ptm compiles for
    CUDA, unless TORCHINDUCTOR_MIX_ORDER_REDUCTION says otherwise; a CPU run leaves it alone (it is CUDA-only)."""
    from torch._inductor import config

    def compiled_for(device: str) -> bool:
        monkeypatch.setattr(config.triton, "mix_order_reduction", True)
        _compiled_by_ptm(device)
        return config.triton.mix_order_reduction

    monkeypatch.delenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", raising=False)
    assert compiled_for("cuda") is False
    assert compiled_for("cpu") is True
    monkeypatch.setenv("TORCHINDUCTOR_MIX_ORDER_REDUCTION", "1")
    assert compiled_for("cuda") is True


def test_the_vocabulary_loss_runs_outside_a_compiled_graph_with_eager_gradients():
    """Traced by dynamo under CUDA bf16 autocast (torch 2.11, an H200), the chunked vocabulary loss gave all-zero
    gradients with the right loss value, so no compiled ptm model learnt there (tests/bench/compile_probe.py); ptm
    runs it outside the graph once it compiles a model. Checked by what the compiled graphs hold (the layer before
    it, not the Function) and by the gradients, which equal eager's."""
    from ptmcli.models import vocab_loss
    from ptmcli.models.vocab_loss import projected_cross_entropy

    _compiled_by_ptm("cpu")
    assert vocab_loss._projected is not vocab_loss._projected_cross_entropy  # compiling a model keeps the loss out
    ops: list[str] = []

    def recording(graph_module, example_inputs):
        ops.extend(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
        return graph_module.forward

    def step(x, weight, targets):
        return projected_cross_entropy(torch.tanh(x), weight, None, targets).loss * 2

    torch.manual_seed(0)
    x, weight, targets = torch.randn(8, 4), torch.randn(10, 4), torch.randint(0, 10, (8,))
    grads = []
    for fn in (step, torch.compile(step, backend=recording)):
        inputs = (x.clone().requires_grad_(), weight.clone().requires_grad_())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # in fp32 dynamo does not trace it anyway (out=)
            loss = fn(*inputs, targets)
        loss.backward()
        grads.append([t.grad for t in inputs])
    torch._dynamo.reset()
    assert any("tanh" in op for op in ops), ops
    # traced, the loss's Function would be one `autograd_function_apply` node holding its forward and backward
    assert not any("autograd_function" in op or "mm" in op or "exp" in op for op in ops), ops
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)
