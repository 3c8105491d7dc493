"""The chunked vocabulary loss: the same loss and gradients as projecting everything at once and taking
F.cross_entropy, for the function itself and for every objective that uses it (fp32, 1e-5), with the chunks
forced small so that several are taken, and several blocks of rows in each; the softmax in fp32 under autocast;
statistics only in evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptmcli.data.lm_examples import permutation
from ptmcli.models import PRETRAINING_MODELS, vocab_loss
from ptmcli.models.exponential import exp_
from ptmcli.models.vocab_loss import IGNORE, projected_cross_entropy
from ptmcli.objectives import OBJECTIVES
from ptmcli.schema import BartArch, BertArch, ElectraArch, GptArch, ObjectiveConfig, RobertaArch, T5Arch, XlnetArch

V = 97
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0, attention_dropout=0.0)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(vocab_loss, "MAX_CHUNK_ELEMENTS", 5 * V)  # 16 rows per chunk (the floor): several chunks
    monkeypatch.setattr(vocab_loss, "CACHE_BLOCK_ELEMENTS", 3 * V)  # 3 rows per block of the softmax: a ragged last


def _compare(ours: torch.Tensor, reference: torch.Tensor, params) -> None:
    ours.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, grads):
        if p.grad is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


def test_loss_gradients_and_statistics_equal_the_full_computation():
    torch.manual_seed(0)
    hidden = torch.randn(70, 24, requires_grad=True)
    weight = (torch.randn(V, 24) * 0.3).requires_grad_()
    bias = torch.randn(V, requires_grad=True)
    targets = torch.randint(0, V, (70,))
    targets[::5] = IGNORE
    out = projected_cross_entropy(hidden, weight, bias, targets, predict=True)
    logits = F.linear(hidden, weight, bias)
    reference = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    assert torch.equal(out.predicted, logits.argmax(-1))
    assert out.sampled is None
    _compare(out.loss, reference, [hidden, weight, bias])


def test_exp_equals_torch_exp_and_underflows_to_zero():
    x = torch.linspace(-87.0, 5.0, 100_001)
    torch.testing.assert_close(exp_(x.clone()), x.exp(), rtol=1e-5, atol=0)  # 3.7e-6 at most here (-87)
    tail = torch.tensor([-95.0, -200.0, torch.finfo(torch.float32).min, float("-inf")])
    out = exp_(tail.clone())
    assert torch.all(out >= 0) and torch.all(out <= 1e-40) and torch.equal(out[1:], torch.zeros(3))
    x = torch.randn(5)
    assert exp_(x) is x  # in place


def test_logits_far_below_their_row_s_largest_give_the_full_computation_s_loss():
    """Logits spread over hundreds of units, as a confident model's: most of a row's exponentials underflow to 0."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 24, requires_grad=True)
    weight = (torch.randn(V, 24) * 20).requires_grad_()
    targets = torch.randint(0, V, (40,))
    logits = F.linear(hidden, weight)
    assert ((logits - logits.amax(-1, keepdim=True)) < -87.3).float().mean() > 0.5
    reference = F.cross_entropy(logits, targets, reduction="sum")
    _compare(projected_cross_entropy(hidden, weight, None, targets).loss, reference, [hidden, weight])


def test_the_logits_buffer_kept_between_calls_on_a_cpu_leaves_no_trace_in_the_next_loss():
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(40, 24), torch.randn(V, 24), torch.randint(0, V, (40,))
    first = projected_cross_entropy(hidden, weight, None, targets).loss
    # a larger call in between: the kept buffer grows and is left full of its logits
    projected_cross_entropy(torch.randn(300, 24), torch.randn(3 * V, 24), None, torch.randint(0, 3 * V, (300,)))
    kept = vocab_loss._KEPT_BUFFERS[torch.device("cpu")]
    assert torch.equal(projected_cross_entropy(hidden, weight, None, targets).loss, first)
    assert vocab_loss._KEPT_BUFFERS[torch.device("cpu")] is kept  # reused, not allocated again


def test_evaluation_computes_no_gradient_and_sampling_follows_the_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4000, 8), torch.randn(V, 8, requires_grad=True)
    targets = torch.zeros(4000, dtype=torch.long)
    with torch.no_grad():
        out = projected_cross_entropy(hidden, weight, None, targets, sample=1.0)
    assert not out.loss.requires_grad
    probs = F.softmax(F.linear(hidden[:1], weight.detach()), -1)[0]
    hidden_same = hidden[:1].expand(4000, -1)
    for temperature in (1.0, 3.0):  # ELECTRA's objective.sampling_temperature: softmax(logits / T)
        with torch.no_grad():
            drawn = projected_cross_entropy(hidden_same, weight, None, targets, sample=temperature).sampled
        frequencies = torch.bincount(drawn, minlength=V).float() / 4000
        expected = F.softmax(F.linear(hidden[:1], weight.detach())[0] / temperature, -1)
        assert (frequencies - expected).abs().max() < 0.03
    assert (expected - probs).abs().max() > 0.1  # the temperature changed the distribution


def test_mixed_precision_keeps_the_softmax_in_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(50, 32, requires_grad=True)
    weight = (torch.randn(V, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, V, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = projected_cross_entropy(hidden, weight, None, targets)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    logits = F.linear(hidden.detach().bfloat16(), weight.detach().bfloat16()).float()
    reference = F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(out.loss, reference, rtol=1e-4, atol=1e-3)


def _batch(family: str) -> dict:
    ids = torch.randint(5, V, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    if family == "gpt":
        return {"input_ids": ids, "attention_mask": mask}
    if family in ("t5", "bart"):
        labels = torch.randint(5, V, (3, 9))
        labels[0, 6:], labels[1, 2:] = IGNORE, IGNORE
        decoder = torch.cat([torch.ones(3, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": decoder,
            "labels": labels,
            "label_terms": torch.tensor([0, 1, 0]),
        }
    if family == "xlnet":
        rng = np.random.default_rng(0)
        ranks, target_mask = [], torch.zeros_like(ids, dtype=torch.bool)
        for row in range(3):
            rank, targets = permutation(20, np.arange(1, 19), 6, rng)
            ranks.append(torch.as_tensor(rank))
            target_mask[row, torch.as_tensor(targets)] = True
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "rank": torch.stack(ranks),
            "target_mask": target_mask,
            "targets": ids[target_mask],
        }
    positions = (torch.rand(ids.shape) < 0.3) & mask.bool()  # electra, bert, roberta
    return {
        "input_ids": ids.masked_fill(positions, 4),
        "token_type_ids": None,
        "attention_mask": mask,
        "mlm_positions": positions,
        "mlm_targets": ids[positions],
    }


CASES = {
    "bert": (BertArch(**SMALL, max_positions=40), "mlm"),
    "roberta": (RobertaArch(**SMALL, max_positions=40), "mlm"),
    "gpt": (GptArch(**SMALL, max_positions=40), "clm"),
    "t5": (T5Arch(**SMALL), "span-corruption"),
    "bart": (BartArch(**SMALL, max_positions=40), "denoise"),
    "xlnet": (XlnetArch(**SMALL), "plm"),
    "electra": (
        ElectraArch(
            **SMALL,
            embedding_size=16,
            generator_hidden_size=16,
            generator_num_heads=2,
            generator_intermediate_size=32,
            max_positions=40,
        ),  # fmt: skip
        "rtd",
    ),
}


def _reference(family: str, model, batch: dict) -> list[torch.Tensor]:
    """Each term's loss the straightforward way: every logit at once, then F.cross_entropy."""
    if family == "gpt":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(ids[:, :-1])
        keep = mask[:, 1:].bool()
        return [F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")]
    if family in ("t5", "bart"):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        labels = batch["labels"]
        if family == "bart":  # one term: every label
            return [F.cross_entropy(logits[labels != IGNORE], labels[labels != IGNORE], reduction="sum")]
        keeps = [(labels != IGNORE) & (batch["label_terms"] == k)[:, None] for k in range(2)]
        return [F.cross_entropy(logits[keep], labels[keep], reduction="sum") for keep in keeps]
    if family == "xlnet":
        logits = model(batch["input_ids"], batch["attention_mask"], batch["rank"], batch["target_mask"])
        return [F.cross_entropy(logits, batch["targets"], reduction="sum")]
    if family in ("bert", "roberta"):
        logits = model(batch["input_ids"], None, batch["attention_mask"], batch["mlm_positions"])["mlm_logits"]
        return [F.cross_entropy(logits, batch["mlm_targets"], reduction="sum")]
    states = model.generator(batch["input_ids"], None, batch["attention_mask"])[batch["mlm_positions"]]
    return [F.cross_entropy(model.mlm_head(states), batch["mlm_targets"], reduction="sum")]


@pytest.mark.parametrize("family", CASES)
def test_every_objective_loss_and_gradients_equal_the_full_computation(family):
    torch.manual_seed(0)
    arch, objective_name = CASES[family]
    objective_cfg = ObjectiveConfig(name=objective_name, full_target_fraction=0.5 if family == "t5" else 0.0)
    model = PRETRAINING_MODELS[family](arch, V, objective_cfg).train()
    objective = OBJECTIVES[objective_name](objective_cfg)
    batch = _batch(family)
    sums, stats = objective(model, batch)
    terms = [t for t in objective.terms if t != "rtd"]  # ELECTRA: the generator's term (samples feed the rest)
    params = list(model.parameters())
    reference = _reference(family, model, batch)
    _compare(sum(sums[t] for t in terms), sum(reference), params)
    for t, r in zip(terms, reference):
        torch.testing.assert_close(sums[t].detach(), r.detach(), rtol=1e-5, atol=1e-5)
    assert all(float(v) == 0 for k, v in stats.items() if k.endswith("_correct") and not k.startswith("rtd"))
    model.eval()
    with torch.no_grad():
        _, stats = objective(model, batch)
        reference_correct = sum(float(r) for r in _correct(family, model, batch))
    assert sum(float(stats[f"{t}_correct"]) for t in terms) == reference_correct


def _correct(family: str, model, batch: dict) -> list[torch.Tensor]:
    if family == "gpt":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = mask[:, 1:].bool()
        return [(model(ids[:, :-1])[keep].argmax(-1) == ids[:, 1:][keep]).sum()]
    if family in ("t5", "bart"):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
        keep = batch["labels"] != IGNORE
        return [(logits[keep].argmax(-1) == batch["labels"][keep]).sum()]
    if family == "xlnet":
        logits = model(batch["input_ids"], batch["attention_mask"], batch["rank"], batch["target_mask"])
        return [(logits.argmax(-1) == batch["targets"]).sum()]
    if family in ("bert", "roberta"):
        logits = model(batch["input_ids"], None, batch["attention_mask"], batch["mlm_positions"])["mlm_logits"]
        return [(logits.argmax(-1) == batch["mlm_targets"]).sum()]
    states = model.generator(batch["input_ids"], None, batch["attention_mask"])[batch["mlm_positions"]]
    return [(model.mlm_head(states).argmax(-1) == batch["mlm_targets"]).sum()]
