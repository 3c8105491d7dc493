"""Encoder-decoders: T5 position buckets, span corruption (and its whole-block targets), BART noise, decoder
causality, cached decoding, beam search, ROUGE."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from ptmcli.data.seq2seq_examples import SpanCorruptionExamples, corrupt_spans, infill, span_noise_mask
from ptmcli.data.tokenizer import SENTINELS
from ptmcli.generation import Sampling, beam_search, generate
from ptmcli.models import SEQ2SEQ_MODELS
from ptmcli.models.t5 import relative_position_bucket
from ptmcli.models.vocab_loss import targeted_cross_entropies
from ptmcli.objectives.seq2seq import Seq2SeqLM
from ptmcli.schema import BartArch, ObjectiveConfig, T5Arch
from ptmcli.tasks.rouge import rouge

V = 60
SMALL = dict(hidden_size=32, num_layers=2, num_decoder_layers=2, num_heads=4, intermediate_size=64, dropout=0.0)
ARCHS = {"t5": T5Arch(**SMALL, attention_dropout=0.0), "bart": BartArch(**SMALL, max_positions=64)}


def _model(family):
    torch.manual_seed(0)
    return SEQ2SEQ_MODELS[family](ARCHS[family], V).eval()


def test_relative_position_buckets_match_hand_computed_values():
    # bidirectional, 32 buckets, max distance 128: 16 per direction, 8 exact, then log-spaced up to 128
    relative = torch.tensor([0, -1, 1, -7, -8, -16, -127, -128, -1000, 8, 16, 1000])
    expected = [0, 1, 17, 7, 8, 10, 15, 15, 15, 24, 26, 31]
    assert relative_position_bucket(relative, True, 32, 128).tolist() == expected
    # causal (decoder): keys after the query all share bucket 0; 16 exact, log-spaced up to 128
    relative = torch.tensor([0, 5, -1, -15, -16, -32, -64, -127, -500])
    expected = [0, 0, 1, 15, 16, 21, 26, 31, 31]
    assert relative_position_bucket(relative, False, 32, 128).tolist() == expected


def test_span_corruption_round_trips_and_orders_sentinels():
    rng = np.random.default_rng(0)
    sentinels = [1000 + k for k in range(100)]
    for length in (10, 57, 128, 500):
        ids = list(range(1, length + 1))
        mask = span_noise_mask(length, 0.15, 3.0, rng)
        assert abs(mask.sum() - round(0.15 * length)) <= 1 and not mask[0]  # starts with a kept span
        spans = int((mask[1:] & ~mask[:-1]).sum())
        assert abs(spans - round(mask.sum() / 3)) <= 1
        inputs, targets = corrupt_spans(ids, mask, sentinels, end=2)
        assert inputs[-1] == 2 and targets[-1] == 2
        used = [t for t in inputs if t >= 1000]
        assert used == sentinels[: len(used)] == [t for t in targets if t >= 1000]  # in order, each once
        # rebuild: every sentinel in the input is replaced by what follows it in the target
        pieces, current = {}, None
        for t in targets[:-1]:
            if t >= 1000:
                current = t
                pieces[current] = []
            else:
                pieces[current].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (pieces[t] if t >= 1000 else [t])]
        assert rebuilt == ids


def _span_examples(fraction: float) -> SpanCorruptionExamples:
    """Blocks of word ids 200.. under a T5-style vocabulary: <pad> <unk> </s>, then the 100 sentinels."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>", *SENTINELS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    chunks = datasets.Dataset.from_dict({"ids": [list(range(200 + i, 260 + i)) for i in range(200)]})
    objective = ObjectiveConfig(name="span-corruption", full_target_fraction=fraction)
    return SpanCorruptionExamples(chunks, tokenizer, objective, seed=3)


def test_whole_block_targets_keep_the_inputs_and_take_their_share():
    paper, mixed = _span_examples(0.0), _span_examples(0.3)
    assert paper.terms == ("span",) and mixed.terms == ("span", "full")
    rows = paper.chunks["ids"]
    full = 0
    for i, ids in enumerate(rows):
        plain, other = paper.example(ids, i, epoch=1), mixed.example(ids, i, epoch=1)
        assert other["inputs"] == plain["inputs"] and plain["term"] == 0  # same corruption either way
        if other["term"]:
            full += 1
            assert other["labels"] == [*ids, 2] and other["decoder_inputs"] == [0, *ids]  # the whole block, shifted
        else:
            assert other["labels"] == plain["labels"]
    assert 0.2 * len(rows) < full < 0.4 * len(rows)
    batch = mixed.batch(list(range(32)), epoch=1)
    per_row = (batch["labels"] != -100).sum(1)
    assert batch["counts"]["full"] == per_row[batch["label_terms"] == 1].sum() > 0
    assert batch["counts"]["span"] + batch["counts"]["full"] == per_row.sum()


def test_two_term_seq2seq_loss_splits_the_rows_by_term():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6], [0, -100, -100, -100]])
    batch = {"input_ids": None, "attention_mask": None, "decoder_input_ids": None, "labels": labels}

    class Model(torch.nn.Module):  # decoder states = the logits, projected through the identity
        def forward(self, *_, targets, predict):
            return targeted_cross_entropies(logits, torch.eye(7), None, targets, predict)

    model = Model().eval()
    sums, stats = Seq2SeqLM("span", "full")(model, {**batch, "label_terms": torch.tensor([0, 1, 0])})
    keep = labels != -100
    token_losses = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
    assert torch.allclose(sums["span"], token_losses[[0, 1, 6]].sum())
    assert torch.allclose(sums["full"], token_losses[2:6].sum())
    predicted = logits[keep].argmax(-1) == labels[keep]
    assert stats["span_correct"] == predicted[[0, 1, 6]].sum() and stats["full_correct"] == predicted[2:6].sum()
    single, _ = Seq2SeqLM("span")(model, batch)  # one term: no label_terms needed
    assert torch.allclose(single["span"], token_losses.sum())
    # a term without rows adds nothing, and its metrics are left out rather than divided by zero
    sums, stats = Seq2SeqLM("span", "full")(model, {**batch, "label_terms": torch.zeros(3, dtype=torch.long)})
    assert sums["full"] == 0 and stats["full_correct"] == 0
    totals = {"span_correct": 3.0, "full_correct": 0.0}
    metrics = Seq2SeqLM("span", "full").metrics({"span": 14.0, "full": 0.0}, {"span": 7, "full": 0}, totals)
    assert metrics["loss"] == metrics["span_loss"] == 2.0 and "full_loss" not in metrics


def test_bart_infilling_covers_about_the_ratio_with_one_mask_per_span():
    rng = np.random.default_rng(0)
    ids = list(range(10, 1010))
    out = infill(ids, 0.3, 3.0, mask_id=4, rng=rng)
    kept = [t for t in out if t != 4]
    assert kept == [t for t in ids if t in set(kept)]  # order kept, nothing invented
    removed = len(ids) - len(kept)
    assert 0.2 * len(ids) < removed <= 0.3 * len(ids)  # overlapping spans can only lower the cover
    masks = out.count(4)
    assert removed / 3 * 0.6 < masks < removed / 3 * 1.6  # one mask per Poisson(3) span, roughly


@pytest.mark.parametrize("family", ARCHS)
def test_decoder_is_causal_and_ignores_encoder_padding(family):
    model = _model(family)
    src = torch.randint(5, V, (2, 9))
    dec = torch.randint(5, V, (2, 8))
    changed = dec.clone()
    changed[:, 5:] = torch.randint(5, V, (2, 3))
    a, b = model(src, None, dec), model(src, None, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    padded = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 4)], 1).long()
    torch.testing.assert_close(model(padded, mask, dec), a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ARCHS)
def test_cached_decoding_equals_full_decoding_and_beam_one_is_greedy(family):
    model = _model(family)
    src = torch.randint(5, V, (3, 11))
    memory = model.encode(src, None)
    start = torch.zeros(3, 1, dtype=torch.long)
    step = lambda ids, cache: model.decode(ids, memory, None, cache)[:, -1]  # noqa: E731
    greedy = generate(step, model.new_cache, start, Sampling(max_new_tokens=12, greedy=True))
    uncached = generate(step, model.new_cache, start, Sampling(max_new_tokens=12, greedy=True, use_cache=False))
    assert torch.equal(greedy, uncached)
    stop = int(greedy[0, 3])  # a token greedy decoding does produce, so that stopping is exercised
    cfg = Sampling(max_new_tokens=12, greedy=True)
    stopped = generate(step, model.new_cache, start, cfg, stop_id=stop).tolist()
    beams = beam_search(step, model.new_cache, start, Sampling(max_new_tokens=12, num_beams=1), stop)
    assert beams == [row[: row.index(stop)] if stop in row else row for row in stopped]
    no_cache = Sampling(max_new_tokens=12, num_beams=1, use_cache=False)
    assert beams == beam_search(step, model.new_cache, start, no_cache, stop)


def test_wider_beams_find_sequences_at_least_as_likely():
    model = _model("t5")
    src = torch.randint(5, V, (2, 11))
    memory = model.encode(src, None)
    start = torch.zeros(2, 1, dtype=torch.long)

    @torch.no_grad()
    def log_prob(rows):
        total = []
        for b, row in enumerate(rows):
            ids = torch.tensor([[0, *row, 1]])
            logp = model.decode(ids[:, :-1], memory[b : b + 1], None).log_softmax(-1)
            total.append(float(logp[0, torch.arange(len(row) + 1), ids[0, 1:]].sum()))
        return total

    def search(k):
        mem = memory.repeat_interleave(k, 0)
        step = lambda ids, cache: model.decode(ids, mem, None, cache)[:, -1]  # noqa: E731
        cfg = Sampling(max_new_tokens=6, num_beams=k, length_penalty=0.0)
        return beam_search(step, model.new_cache, start, cfg, 1)

    narrow, wide = log_prob(search(1)), log_prob(search(4))
    assert all(w >= n - 1e-4 for w, n in zip(wide, narrow))


def test_rouge_against_hand_computed_values():
    # candidate "the cat sat on the mat" vs reference "the cat is on the mat"
    scores = rouge("The cat sat on the mat.", "the cat is on the mat")
    assert scores["rouge1"] == pytest.approx(5 / 6)  # the, cat, on, the, mat shared: P = R = 5/6
    assert scores["rouge2"] == pytest.approx(3 / 5)  # the cat, on the, the mat
    assert scores["rougeL"] == pytest.approx(5 / 6)  # LCS: the cat on the mat
    scores = rouge("police arrest man", "man arrested by police after chase")
    assert scores["rouge1"] == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert scores["rouge2"] == 0.0
    assert scores["rougeL"] == pytest.approx(2 * (1 / 3) * (1 / 6) / (1 / 3 + 1 / 6))
    assert rouge("", "anything") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_t5_under_fp16_autocast_stays_finite():
    torch.manual_seed(0)
    arch = T5Arch(hidden_size=256, num_layers=4, num_decoder_layers=4, num_heads=4, intermediate_size=1024)
    model = SEQ2SEQ_MODELS["t5"](arch, 1000).cuda().eval()
    with torch.no_grad():  # large weights, as trained T5 checkpoints grow them, push activations past fp16's range
        for layer in model.encoder.layers:
            layer.ffn.down.weight.mul_(300)
    src = torch.randint(5, 1000, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        logits = model(src, None, src[:, :16])
    assert torch.isfinite(logits).all()
