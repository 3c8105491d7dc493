"""Checkpoint round trip, pruning, and what counts as complete."""

from __future__ import annotations

import errno

import pytest
import torch

from ptmcli import checkpoint
from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
from ptmcli.models.bert import BertForPretraining
from ptmcli.optim import build_optimizer, build_schedule
from ptmcli.schema import BertArch, OptimizerConfig

ARCH = BertArch(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=16)


def _parts(seed: int, optimizer_name: str = "adamw"):
    torch.manual_seed(seed)
    model = BertForPretraining(ARCH, 30, nsp=True)
    optimizer = build_optimizer(model, OptimizerConfig(name=optimizer_name), torch.device("cpu"))
    return (
        model,
        optimizer,
        build_schedule(optimizer, OptimizerConfig(warmup_steps=2), 10),
        torch.amp.GradScaler("cpu", enabled=False),
    )


def _train_step(model, optimizer, scheduler):
    ids = torch.randint(5, 30, (2, 8))
    out = model(ids, mlm_positions=ids > 15)
    (out["mlm_logits"].sum() + out["nsp_logits"].sum()).backward()
    optimizer.step(), scheduler.step(), optimizer.zero_grad()


@pytest.mark.parametrize("optimizer_name", ["adamw", "adafactor"])
def test_round_trip_restores_everything(tmp_path, optimizer_name):
    model, optimizer, scheduler, scaler = _parts(0, optimizer_name)
    assert type(optimizer).__name__.lower() == optimizer_name
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    spec = {"family": "bert", "vocab_size": 30}
    path = checkpoint.save(tmp_path, 3, model, optimizer, scheduler, scaler, {"consumed": 3, "model": spec}, Dist(), 0)
    expected_next = torch.rand(3)
    other, other_opt, other_sched, other_scaler = _parts(1, optimizer_name)
    torch.manual_seed(123)
    state, _ = checkpoint.load(path, other, other_opt, other_sched, other_scaler, Dist(), spec)
    assert state["step"] == 3 and state["consumed"] == 3
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.mlm_head.word_embeddings.weight is other.encoder.embeddings.word.weight  # still tied
    assert other_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.allclose(torch.rand(3), expected_next)  # the RNG continues where it was saved
    # one more identical step lands on identical weights only if the moments (Adam's, Adafactor's factored
    # ones) and step counts came back too
    for parts in ((model, optimizer, scheduler), (other, other_opt, other_sched)):
        torch.manual_seed(7)
        _train_step(*parts)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    model, optimizer, scheduler, scaler = _parts(0)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, optimizer, scheduler, scaler, {"model": {}}, Dist(), keep_last=2)
    (tmp_path / "step-9").mkdir()  # a write that never completed
    (tmp_path / ".tmp-step-10").mkdir()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert checkpoint.latest(tmp_path).name == "step-3" and (tmp_path / "latest").resolve().name == "step-3"


def test_metrics_rows_after_the_checkpoint_and_a_torn_line_are_dropped(tmp_path):
    from ptmcli.runlog import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "val", "loss": 1.5}\n'
        '{"step": 3, "split": "train", "loss": 1.0}\n{"step": 4, "spl'
    )
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "val", "loss": 1.5}\n'


def test_a_full_disk_leaves_no_temporary_directory_and_says_what_is_intact(tmp_path, monkeypatch):
    model, optimizer, scheduler, scaler = _parts(0)
    checkpoint.save(tmp_path, 1, model, optimizer, scheduler, scaler, {"model": {}}, Dist(), keep_last=0)
    (tmp_path / ".tmp-step-7-0123abcd").mkdir()  # left by a process killed mid-write: cleared by the next save

    def disk_full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    with pytest.raises(
        PtmError,
        match="No space left on device. Nothing half-written was left behind; the newest intact checkpoint is step-1",
    ):
        checkpoint.save(tmp_path, 2, model, optimizer, scheduler, scaler, {"model": {}}, Dist(), keep_last=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]
    assert checkpoint.damage(tmp_path / "step-1") is None
