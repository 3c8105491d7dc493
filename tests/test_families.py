"""Model families beyond BERT: shapes, the attention rules each one depends on, KV-cache decoding, sampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ptmcli.data.lm_examples import permutation
from ptmcli.generation import Sampling, filter_logits, generate
from ptmcli.models import ENCODERS, PRETRAINING_MODELS
from ptmcli.models.heads import TaskModel
from ptmcli.models.xlnet import XlnetForPermutationLM
from ptmcli.schema import ElectraArch, GptArch, ObjectiveConfig, RobertaArch, XlnetArch

V = 50
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0, attention_dropout=0.0)
ARCHS = {
    "gpt": GptArch(**SMALL, max_positions=40),
    "roberta": RobertaArch(**SMALL, max_positions=40),
    "xlnet": XlnetArch(**SMALL),
    "electra": ElectraArch(
        **SMALL,
        embedding_size=16,
        generator_hidden_size=16,
        generator_num_heads=2,
        generator_intermediate_size=32,
        max_positions=40,
    ),
}


def _encoder(family):
    torch.manual_seed(0)
    return ENCODERS[family](ARCHS[family], V).eval()


@pytest.mark.parametrize("family", ARCHS)
def test_encoder_and_heads_shapes(family):
    encoder = _encoder(family)
    ids = torch.randint(5, V, (3, 11))
    assert encoder(ids).shape == (3, 11, 32)
    for head, shape in (("sequence", (3, 4)), ("token", (3, 11, 4)), ("span", (3, 11, 2))):
        assert TaskModel(encoder, head, 4, 0.0)(ids).shape == shape


@pytest.mark.parametrize("family", ["roberta", "xlnet", "electra"])
def test_bidirectional_encoders_ignore_padding(family):
    encoder = _encoder(family)
    ids = torch.randint(5, V, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()
    torch.testing.assert_close(encoder(padded, None, mask)[:, :9], encoder(ids), atol=1e-5, rtol=1e-5)


def test_gpt_future_tokens_cannot_change_past_logits():
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["gpt"](ARCHS["gpt"], V, ObjectiveConfig(name="clm")).eval()
    ids = torch.randint(0, V, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, V, (2, 5))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_summary_is_the_last_real_token():
    """Right padding is invisible to a causal model; the sequence head reads the last real token."""
    encoder = _encoder("gpt")
    head = TaskModel(encoder, "sequence", 3, 0.0).eval()
    ids = torch.randint(0, V, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    torch.testing.assert_close(head(padded, None, mask), head(ids))


def test_kv_cache_logits_equal_a_full_forward():
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["gpt"](ARCHS["gpt"], V, ObjectiveConfig(name="clm")).eval()
    ids = torch.randint(0, V, (2, 10))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :4], cache=cache)]  # a prompt of 4, then one token at a time
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def _xlnet_streams(model, ids, rank):
    mask = torch.ones_like(ids)
    return model.encoder.two_stream(ids, mask, rank)


def test_xlnet_query_stream_never_sees_its_own_content_and_follows_the_order():
    torch.manual_seed(0)
    model = XlnetForPermutationLM(ARCHS["xlnet"], V).eval()
    T = 10
    ids = torch.randint(5, V, (1, T))
    rank = torch.tensor([[3, 0, 7, 1, 9, 2, 8, 4, 6, 5]])
    h, g = _xlnet_streams(model, ids, rank)
    for position in range(T):
        changed = ids.clone()
        changed[0, position] = (ids[0, position] + 1) % V
        h2, g2 = _xlnet_streams(model, changed, rank)
        # the query stream at `position` is blind to that token itself
        torch.testing.assert_close(g2[0, position], g[0, position])
        later = rank[0] > rank[0, position]  # tokens after `position` in the order
        earlier = rank[0] < rank[0, position]
        # no stream at an earlier position in the order sees a token that comes later
        torch.testing.assert_close(h2[0, earlier], h[0, earlier])
        torch.testing.assert_close(g2[0, earlier], g[0, earlier])
        # and everything after it does see it (content stream of itself too)
        if later.any():
            assert not torch.allclose(g2[0, later], g[0, later])
        assert not torch.allclose(h2[0, position], h[0, position])


def test_permutation_targets_are_the_last_sixth_of_the_order_and_never_special():
    rng = np.random.default_rng(0)
    candidates = np.arange(1, 61)  # position 0 and 61 are [CLS] / [SEP]
    rank, targets = permutation(62, candidates, 6, rng)
    assert sorted(rank.tolist()) == list(range(62))
    assert len(targets) == 10 and set(targets) <= set(candidates.tolist())
    assert sorted(rank[targets].tolist()) == list(range(52, 62))  # the targets close the order


def test_xlnet_positions_are_relative_only():
    """Left padding shifts every absolute position; with relative positions only, the real tokens' states
    are unchanged (an absolute-position model would fail this), while reordering the tokens changes them."""
    encoder = _encoder("xlnet")
    with torch.no_grad():  # sharpen attention: at init it is nearly uniform, which would hide positions
        for layer in encoder.layers:
            layer.attention.qkv.weight.mul_(10)
            layer.attention.position.weight.mul_(10)
    ids = torch.randint(5, V, (1, 8))
    shifted = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 8)], 1).long()
    torch.testing.assert_close(encoder(shifted, None, mask)[:, 5:], encoder(ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(encoder(ids.flip(1)).flip(1), encoder(ids), atol=1e-3)


def test_electra_shares_embeddings_and_flags_only_sampled_replacements():
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["electra"](ARCHS["electra"], V, ObjectiveConfig(name="rtd")).eval()
    assert model.generator.embeddings is model.encoder.embeddings
    assert model.mlm_head.word_embeddings is model.encoder.embeddings.word
    ids = torch.randint(5, V, (2, 12))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, [2, 5, 9]] = True
    targets = ids[positions]
    inputs = ids.clone()
    inputs[positions] = 4  # [MASK]
    out = model(inputs, None, None, positions, targets)
    assert out["mlm_loss"].shape == () and out["rtd_logits"].shape == (2, 12)
    assert not out["replaced"][~positions].any()  # only masked positions can have been replaced
    # the discriminator starts calibrated to the masking rate (from 0 it collapses, see ElectraForPretraining)
    assert torch.sigmoid(model.rtd_out.bias).item() == pytest.approx(ObjectiveConfig(name="rtd").mask_prob)


def test_electra_with_all_weights_shared_trains_the_discriminator_by_the_generators_loss_too():
    """model.share_all_weights: the generator is the discriminator with an MLM head (the paper's section 3.2), so the
    masked-LM loss alone reaches every discriminator layer, and the model holds no second encoder."""
    torch.manual_seed(0)
    arch = dataclasses.replace(ARCHS["electra"], share_all_weights=True)
    model = PRETRAINING_MODELS["electra"](arch, V, ObjectiveConfig(name="rtd"))
    assert model.generator is model.encoder
    owners = {name.split(".")[0] for name, _ in model.named_parameters()}  # each shared weight is named once
    assert owners == {"encoder", "mlm_head", "rtd_dense", "rtd_out"}
    ids = torch.randint(5, V, (2, 12))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, [2, 5, 9]] = True
    targets, inputs = ids[positions], ids.masked_fill(positions, 4)
    model(inputs, None, None, positions, targets)["mlm_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.layers.parameters())


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, 2, 1.0)) == [True, True, False, False]
    assert keep(filter_logits(logits, 0, 0.75)) == [True, True, False, False]  # 0.5 < 0.75 <= 0.8
    assert keep(filter_logits(logits, 0, 0.8)) == [True, True, False, False]
    assert keep(filter_logits(logits, 0, 0.81)) == [True, True, True, False]
    assert keep(filter_logits(logits, 0, 0.1)) == [True, False, False, False]  # the top token always stays


@pytest.mark.parametrize("settings", [dict(greedy=True), dict(top_p=0.9, seed=3), dict(top_k=5, temperature=0.7)])
def test_generation_with_cache_equals_without_and_is_seeded(settings):
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["gpt"](ARCHS["gpt"], V, ObjectiveConfig(name="clm")).eval()
    prompt = torch.randint(0, V, (1, 5))

    def run(**extra):
        cfg = Sampling(max_new_tokens=20, **{**settings, **extra})
        return generate(lambda ids, cache: model(ids, cache=cache)[:, -1], model.new_cache, prompt, cfg)

    cached = run()
    assert cached.shape == (1, 20)
    assert torch.equal(cached, run(use_cache=False))
    assert torch.equal(cached, run())
    if not settings.get("greedy"):
        assert not torch.equal(cached, run(seed=settings.get("seed", 0) + 1))


def test_generation_stops_at_the_end_token_and_at_the_context_length():
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["gpt"](ARCHS["gpt"], V, ObjectiveConfig(name="clm")).eval()
    prompt = torch.randint(0, V, (1, 5))
    step = lambda ids, cache: model(ids, cache=cache)[:, -1]  # noqa: E731
    greedy = generate(step, model.new_cache, prompt, Sampling(max_new_tokens=10, greedy=True))
    first = int(greedy[0, 0])
    stopped = generate(step, model.new_cache, prompt, Sampling(max_new_tokens=10, greedy=True), stop_id=first)
    assert stopped.tolist() == [[first]]
    capped = generate(step, model.new_cache, prompt, Sampling(max_new_tokens=100, greedy=True), max_length=40)
    assert capped.shape == (1, 35)


def test_causal_lm_loss_and_gradients_equal_the_gathered_computation():
    """Targets with ignore_index instead of a boolean gather of the (B, T, V) logits: same loss and gradients
    (fp32, 1e-5), padding still ignored, and the accuracy statistic counted only in evaluation."""
    import torch.nn.functional as F

    from ptmcli.objectives.clm import CausalLM

    torch.manual_seed(0)
    model = PRETRAINING_MODELS["gpt"](ARCHS["gpt"], V, None).train()
    ids = torch.randint(1, V, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0  # the packed stream's last, short blocks
    sums, stats = CausalLM()(model, {"input_ids": ids, "attention_mask": mask})
    sums["clm"].backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids[:, :-1])
    keep = mask[:, 1:].bool()
    reference = F.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
    reference.backward()
    torch.testing.assert_close(sums["clm"], reference, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert stats["clm_correct"] == 0  # training: no argmax over the vocabulary
    with torch.no_grad():
        _, stats = CausalLM()(model.eval(), {"input_ids": ids, "attention_mask": mask})
    assert stats["clm_correct"] == (logits[keep].argmax(-1) == ids[:, 1:][keep]).sum()
