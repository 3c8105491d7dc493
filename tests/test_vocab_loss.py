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
from ptmcli.models import ENCODERS, PRETRAINING_MODELS, layers, vocab_loss
from ptmcli.models.exponential import exp_
from ptmcli.models.heads import TaskModel
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


def _inputs(rows: int, width: int, weight_std: float, ignored_every: int) -> tuple[torch.Tensor, ...]:
    """Random (hidden, weight, bias, targets) of a projected cross-entropy, every `ignored_every`-th target IGNORE."""
    torch.manual_seed(0)
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = (torch.randn(V, width) * weight_std).requires_grad_()
    bias = torch.randn(V, requires_grad=True)
    targets = torch.randint(0, V, (rows,))
    targets[::ignored_every] = IGNORE
    return hidden, weight, bias, targets


def test_loss_gradients_and_statistics_equal_the_full_computation():
    hidden, weight, bias, targets = _inputs(70, 24, 0.3, 5)
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


def test_bf16_products_on_a_cpu_run_on_whole_buckets_of_rows_and_give_the_same_loss_and_gradients(monkeypatch):
    """oneDNN keeps a kernel for each shape it meets: the chunks' products in bf16 see row counts padded to a
    multiple of SHAPE_ROWS (here 8; chunks of 16 rows, a last one of 2), and the zero rows change nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ProductShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and args[-1].dtype == torch.bfloat16:
                a, b = args[-2], args[-1]
                self.rows += [d for d in (*a.shape, *b.shape) if d not in (1, 32, V)]
            return func(*args, **(kwargs or {}))

    hidden, weight, bias, targets = _inputs(50, 32, 0.2, 7)

    def run(shape_rows: int) -> list[torch.Tensor]:
        monkeypatch.setattr(vocab_loss, "SHAPE_ROWS", shape_rows)
        for p in (hidden, weight, bias):
            p.grad = None
        shapes = ProductShapes()
        with torch.autocast("cpu", dtype=torch.bfloat16), shapes:
            out = projected_cross_entropy(hidden, weight, bias, targets)
        out.loss.backward()
        return [out.loss.detach(), hidden.grad, weight.grad, bias.grad], shapes.rows

    padded, rows = run(8)
    plain, plain_rows = run(1)
    assert rows and all(r % 8 == 0 for r in rows), rows
    assert 2 in plain_rows  # without the padding the last chunk's products run on its 2 rows
    for ours, reference in zip(padded, plain):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,objective_name", [("bert", "mlm-nsp"), ("roberta", "mlm")])
def test_mlm_in_bf16_on_a_cpu_predicts_whole_buckets_of_rows_with_the_same_loss_and_gradients(
    family, objective_name, monkeypatch
):
    """Under CPU autocast the MLM objective pads its masked positions to a multiple of SHAPE_ROWS (here 8) with
    unmasked real tokens whose targets are IGNORE: the same loss and accuracy as without, the gradients to bf16's
    rounding (the last layer's products run on more rows)."""
    from ptmcli.objectives import mlm

    torch.manual_seed(0)
    arch = CASES[family][0]
    cfg = ObjectiveConfig(name=objective_name)
    model = PRETRAINING_MODELS[family](arch, V, cfg).train()
    objective = OBJECTIVES[objective_name](cfg)
    batch = _batch(family)
    if objective_name == "mlm-nsp":
        batch["token_type_ids"], batch["nsp_labels"] = torch.zeros_like(batch["input_ids"]), torch.tensor([0, 1, 0])
        batch["mlm_positions"][:, 0] = False
        batch["mlm_targets"] = batch["input_ids"][batch["mlm_positions"]]
    monkeypatch.setattr(mlm, "SHAPE_ROWS", 8)
    masked = batch["mlm_positions"]
    positions, targets = mlm.whole_buckets_of_rows(masked, batch["mlm_targets"], batch["attention_mask"])
    added = positions & ~batch["mlm_positions"]
    assert len(targets) % 8 == 0 and added.any()
    assert not (added & ~batch["attention_mask"].bool()).any() and not added[:, 0].any()
    assert added.sum(1).max() <= -(-int(added.sum()) // 3)  # spread over the rows
    assert torch.equal(targets[batch["mlm_positions"][positions]], batch["mlm_targets"])
    assert (targets[added[positions]] == IGNORE).all()

    def run(shape_rows: int, training: bool):
        monkeypatch.setattr(mlm, "SHAPE_ROWS", shape_rows)
        model.train(training)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, stats = objective(model, batch)
        if training:
            sum(sums.values()).backward()
        return [*sums.values(), *stats.values()], [p.grad for p in model.parameters()]

    padded, padded_grads = run(8, True)
    plain, plain_grads = run(1, True)
    for ours, reference in zip([*padded, *padded_grads], [*plain, *plain_grads]):
        if reference is not None:
            torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-3)
    with torch.no_grad():
        assert run(8, False)[0][len(objective.terms) :] == run(1, False)[0][len(objective.terms) :]


def test_electra_in_bf16_on_a_cpu_runs_its_generator_on_whole_buckets_of_rows_and_masks_only_the_masked(monkeypatch):
    """ELECTRA's generator, like MLM, predicts at whole buckets of rows under CPU autocast (here 8); the added
    positions are predicted against IGNORE but keep their tokens: nothing but the masked positions is replaced, and
    the generator's loss, accuracy and gradients are those without the padding (to bf16's rounding)."""
    from ptmcli.objectives import mlm

    torch.manual_seed(0)
    arch, name = CASES["electra"]
    cfg = ObjectiveConfig(name=name)
    model = PRETRAINING_MODELS["electra"](arch, V, cfg)
    objective = OBJECTIVES[name](cfg)
    batch = _batch("electra")
    if int(batch["mlm_positions"].sum()) % 8 == 0:  # one fewer, so that there is a bucket to fill
        first = batch["mlm_positions"].reshape(-1).nonzero()[0]
        batch["mlm_positions"].view(-1)[first] = False
        batch["input_ids"].view(-1)[first] = 5
        batch["mlm_targets"] = batch["mlm_targets"][1:]
    seen = []
    forward = model.forward

    def recording(*args, **kwargs):
        seen.append(args[3])
        out = forward(*args, **kwargs)
        seen.append(out["replaced"])
        return out

    monkeypatch.setattr(model, "forward", recording)

    def run(shape_rows: int, training: bool):
        monkeypatch.setattr(mlm, "SHAPE_ROWS", shape_rows)
        model.train(training)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, stats = objective(model, batch)
        if training:
            sums["mlm"].backward()  # the generator's loss: the discriminator's input holds its samples
        generator = [p.grad for p in model.generator.parameters()] + [p.grad for p in model.mlm_head.parameters()]
        return sums["mlm"].detach(), stats["mlm_correct"], generator

    padded = run(8, True)
    positions, replaced = seen[-2], seen[-1]
    assert int(positions.sum()) % 8 == 0 and (positions & ~batch["mlm_positions"]).any()
    assert not (replaced & ~batch["mlm_positions"]).any() and replaced.any()
    plain = run(1, True)
    assert torch.equal(seen[-2], batch["mlm_positions"])
    torch.testing.assert_close(padded[0], plain[0], rtol=2e-2, atol=2e-3)
    for ours, reference in zip(padded[2], plain[2]):
        if reference is not None:
            torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-3)
    with torch.no_grad():
        assert run(8, False)[1] == run(1, False)[1]


def _length_runner(monkeypatch, model, objective, lengths: list):
    """run(batch, multiple, training, bf16) -> (losses, statistics, gradients, the lengths `lengths` recorded), with
    the layers' LENGTH_MULTIPLE set to `multiple`."""

    def run(batch: dict, multiple: int, training: bool = True, bf16: bool = True):
        monkeypatch.setattr(layers, "LENGTH_MULTIPLE", multiple)
        model.train(training)
        model.zero_grad(set_to_none=True)
        lengths.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            sums, stats = objective(model, batch)
        if training:
            sum(sums.values()).backward()
        return [*sums.values()], [*stats.values()], [p.grad for p in model.parameters()], list(lengths)

    return run


def _same_to_bf16_rounding(padded: tuple, plain: tuple) -> None:
    for ours, reference in zip([*padded[0], *padded[2]], [*plain[0], *plain[2]]):
        if reference is not None:
            torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_padded_seq2seq_batches_in_bf16_on_a_cpu_take_whole_lengths_with_the_same_loss_and_gradients(
    family, monkeypatch
):
    """Under CPU autocast an encoder-decoder's padded batch is padded further to a multiple of LENGTH_MULTIPLE
    positions on each side (the encoder's 20 -> 24, the decoder's 9 -> 16; at most BART's learned positions), so
    that oneDNN meets a handful of shapes; the loss, accuracy and gradients are those without, to bf16's rounding.
    A side without padding keeps its length, and fp32 runs as it comes."""
    torch.manual_seed(0)
    arch, name = CASES[family]
    cfg = ObjectiveConfig(name=name, full_target_fraction=0.5 if family == "t5" else 0.0)
    model = PRETRAINING_MODELS[family](arch, V, cfg)
    objective = OBJECTIVES[name](cfg)
    lengths = []
    for method in ("encode", "decoder_states"):  # record the length each side runs at
        original = getattr(model, method)
        recording = lambda ids, *a, original=original, **k: lengths.append(ids.shape[1]) or original(ids, *a, **k)  # noqa: E731
        monkeypatch.setattr(model, method, recording)

    run = _length_runner(monkeypatch, model, objective, lengths)
    batch = _batch(family)
    padded, plain = run(batch, 8), run(batch, 1)
    assert padded[3] == [24, 16] and plain[3] == [20, 9]
    _same_to_bf16_rounding(padded, plain)
    with torch.no_grad():
        assert run(batch, 8, training=False)[1] == run(batch, 1, training=False)[1]
    assert run(batch, 8, bf16=False)[3] == [20, 9]
    full = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]), labels=batch["labels"].clamp(min=5))
    assert run(full, 8)[3] == [20, 9]
    if family == "bart":  # 40 learned positions: 20 -> 24 only as far as there are positions
        monkeypatch.setattr(model, "max_length", 22)
        assert run(batch, 8)[3] == [22, 16]


def test_padded_encoder_batches_in_bf16_on_a_cpu_run_their_layers_at_whole_lengths(monkeypatch):
    """An encoder's padded batch (BERT's here) runs its layers at a multiple of LENGTH_MULTIPLE positions under CPU
    autocast (20 -> 24), the added positions padding like the rest: the same loss, accuracy and gradients to bf16's
    rounding, the states returned at the batch's own length; fp32, and a batch without padding, as they come."""
    torch.manual_seed(0)
    arch, name = CASES["bert"]
    cfg = ObjectiveConfig(name=name)
    model = PRETRAINING_MODELS["bert"](arch, V, cfg)
    objective = OBJECTIVES[name](cfg)
    lengths = []
    padding_mask = layers.padding_mask
    monkeypatch.setattr(layers, "padding_mask", lambda mask: lengths.append(mask.shape[1]) or padding_mask(mask))

    run = _length_runner(monkeypatch, model, objective, lengths)
    batch = _batch("bert")
    padded, plain = run(batch, 8), run(batch, 1)
    assert padded[3] == [24] and plain[3] == [20]
    _same_to_bf16_rounding(padded, plain)
    with torch.no_grad():
        assert run(batch, 1, training=False)[1] == run(batch, 8, training=False)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = model.encoder(batch["input_ids"], None, batch["attention_mask"])
        assert states.shape[:2] == (3, 20) and lengths[-1] == 24
    assert run(batch, 8, bf16=False)[3] == [20]
    full = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    assert run(full, 8)[3] == [20]


@pytest.mark.parametrize("family", ["bert", "gpt", "xlnet", "t5"])
def test_task_heads_in_bf16_on_a_cpu_run_a_padded_batch_at_a_whole_length(family, monkeypatch):
    """Fine-tuning under CPU autocast: a padded batch runs encoder and head at a multiple of LENGTH_MULTIPLE
    positions (20 -> 24; at most the learned positions there are), so that oneDNN meets a handful of shapes; a token
    head's outputs come back at the batch's own length, and every head's outputs and gradients are those without, to
    bf16's rounding. fp32, and a batch without padding, run as they come."""
    torch.manual_seed(0)
    encoder = ENCODERS[family](CASES[family][0], V)
    lengths = []
    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda ids, *a: lengths.append(ids.shape[1]) or forward(ids, *a))
    ids, mask = _batch("gpt").values()  # 3 rows of 20 positions, the last one 12 real tokens

    for kind, shape in (("token", (3, 20, 5)), ("sequence", (3, 5))):
        model = TaskModel(encoder, kind, 5, dropout=0.0)
        weights = torch.randn(shape)

        def run(multiple: int, batch_mask: torch.Tensor = mask, bf16: bool = True):
            monkeypatch.setattr(layers, "LENGTH_MULTIPLE", multiple)
            model.zero_grad(set_to_none=True)
            lengths.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs = model(ids, None, batch_mask)
            assert outputs.shape == shape
            (outputs.float() * weights).sum().backward()
            return [outputs.float()], None, [p.grad for p in model.parameters()], list(lengths)

        padded, plain = run(8), run(1)
        assert padded[3] == [24] and plain[3] == [20]
        _same_to_bf16_rounding(padded, plain)
        assert run(8, bf16=False)[3] == [20] and run(8, torch.ones_like(mask))[3] == [20]
    if family == "bert":  # 22 learned positions: 20 -> 24 only as far as there are positions
        monkeypatch.setattr(encoder.arch, "max_positions", 22)
        assert run(8)[3] == [22]
