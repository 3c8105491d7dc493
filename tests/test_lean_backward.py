"""What the layers keep for the backward pass (peak memory, issue 20): the same outputs and gradients as the
straightforward computation, with fewer or smaller tensors kept between the passes."""

import functools

import pytest
import torch
import torch.nn.functional as F

from ptmcli.models import PRETRAINING_MODELS, layers
from ptmcli.models import attention as attention_module
from ptmcli.models import rows as row_sets
from ptmcli.models.attention import CrossAttention, attention
from ptmcli.models.dropout import dropout, dropout_matmul
from ptmcli.models.layers import FeedForward, residual
from ptmcli.models.recompute import BiasedAttention, RMSNormThenLinear, rms_norm
from ptmcli.models.rows import PackedRows, QueryRows
from ptmcli.models.xlnet import TwoStreamAttention, relative_shift, relative_sinusoid
from ptmcli.schema import BartArch, BertArch, ElectraArch, GptArch, ObjectiveConfig, RobertaArch, T5Arch, XlnetArch


def kept_storages(fn, *args) -> list[torch.Tensor]:
    """The distinct tensors autograd keeps for the backward pass of fn(*args) (parameters and inputs included)."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return list(kept.values())


def outputs_and_grads(fn, inputs, params) -> list[torch.Tensor]:
    for t in (*inputs, *params):
        t.grad = None
    out = fn(*inputs)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out, *(t.grad for t in (*inputs, *params))]


@pytest.mark.parametrize("activation", ["gelu", "gelu-tanh"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("recompute_up", [False, True])
def test_feed_forward_keeps_one_wide_tensor_with_the_gradients_of_the_plain_computation(
    activation, autocast, recompute_up
):
    """GELU's input alone is kept (its output is recomputed); with recompute_up (XLNet) not even that: the up
    projection runs again in backward from the kept x."""
    torch.manual_seed(0)
    ffn = FeedForward(16, 64, activation=activation, recompute_up=recompute_up)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def plain(x):
        return ffn.down(ffn.activation(ffn.up(x)))

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return outputs_and_grads(fn, [x], list(ffn.parameters()))

    for ours, ref in zip(run(ffn), run(plain)):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    wide = [t for t in kept_storages(ffn, x) if t.numel() == 3 * 5 * 64]
    assert len(wide) == (0 if recompute_up else 1)  # the activation's input; the plain computation keeps its output too
    assert len([t for t in kept_storages(plain, x) if t.numel() == 3 * 5 * 64]) == 2


@pytest.mark.parametrize("recompute_up", [False, True])
def test_feed_forward_with_frozen_weights_still_passes_the_input_gradient(recompute_up):
    ffn = FeedForward(16, 64, recompute_up=recompute_up).requires_grad_(False)
    x = torch.randn(2, 3, 16, requires_grad=True)
    ffn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in ffn.parameters())


def test_dropout_matmul_equals_dropout_then_product_and_keeps_no_dropped_copy():
    weights = torch.randn(2, 4, 128, 128).softmax(-1).requires_grad_()  # above dropout.SMALL units
    values = torch.randn(2, 4, 128, 16, requires_grad=True)
    results = []
    for fn in (lambda w, v: dropout(w, 0.1) @ v, lambda w, v: dropout_matmul(w, v, 0.1)):
        torch.manual_seed(1)  # the same seed, so the same mask
        results.append(outputs_and_grads(fn, [weights, values], []))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    kept = kept_storages(lambda w, v: dropout_matmul(w, v, 0.1), weights, values)
    assert {t.untyped_storage().data_ptr() for t in kept} == {
        weights.untyped_storage().data_ptr(),
        values.untyped_storage().data_ptr(),
    }


@pytest.mark.parametrize("T", [1, 2, 9])
def test_relative_shift_picks_the_score_for_each_distance(T):
    by_distance = torch.randn(2, 3, T, 2 * T - 1)
    i = torch.arange(T)
    column = (T - 1) - (i[:, None] - i[None, :])  # the column of distance i - j
    torch.testing.assert_close(relative_shift(by_distance), by_distance.gather(-1, column.expand(2, 3, T, T)))


@pytest.mark.parametrize("scale", [1.0, None])
def test_attention_with_a_bias_that_needs_a_gradient_gives_sdpas_outputs_and_gradients_on_a_cpu(scale):
    """T5's position bias, masked at padded keys: ptm writes out the computation SDPA runs as its reference there."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, requires_grad=True) for _ in range(3))
    relative = torch.randn(1, 2, 5, 5, requires_grad=True)
    allowed = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]).bool()[:, None, None, :]
    grad = torch.randn(3, 2, 5, 8)
    results = []
    for way in (attention, lambda *a: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3], scale=a[6])):
        out = way(q, k, v, relative.masked_fill(~allowed, float("-inf")), 0.0, False, scale)
        out.backward(grad)
        results.append([out.detach(), *(t.grad.clone() for t in (q, k, v, relative))])
        for t in (q, k, v, relative):
            t.grad = None
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_a_query_with_nothing_to_see_gets_zeros_and_finite_gradients():
    """The first token in the factorisation order sees nothing in the query stream: its attention output is
    zero (not a uniform average over tokens it may not see) and no NaN reaches the gradients."""
    torch.manual_seed(0)
    T = 6
    attention = TwoStreamAttention(16, 2, 0.0)
    h, g = (torch.randn(1, T, 16, requires_grad=True) for _ in range(2))
    rank = torch.randperm(T)[None]
    content = (rank[:, None, :] <= rank[:, :, None])[:, None]
    query = (rank[:, None, :] < rank[:, :, None])[:, None]
    _, g_out = attention(h, g, content, query, relative_sinusoid(T, 16, h.device))
    first = int(rank[0].argmin())
    assert torch.equal(g_out[0, first], torch.zeros(16))  # XLNet's output projection has no bias
    assert (g_out[0].abs().sum(-1) > 0).sum() == T - 1  # every other query attends to something
    g_out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (h, g, *attention.parameters()) if t.grad is not None)


def test_rms_norm_keeps_its_input_and_one_number_per_token_with_the_plain_gradients():
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 16, requires_grad=True), (1 + 0.1 * torch.randn(16)).requires_grad_()

    def plain(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    results = [
        outputs_and_grads(lambda x: fn(x, weight), [x], [weight]) for fn in (lambda x, w: rms_norm(x, w, 1e-6), plain)
    ]
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    kept = kept_storages(lambda x: rms_norm(x, weight, 1e-6), x)
    assert sorted(t.numel() for t in kept) == [15, 16, 3 * 5 * 16]  # 1 / rms per token, the weight, the input


def test_rms_norm_under_bf16_autocast_computes_its_statistic_in_fp32():
    """CPU autocast runs `linalg.vecdot` in bf16: the norm's sum of squares is taken outside it, so under autocast
    the norm (fp32 weight, fp32 result) and its input's gradient are those of fp32, bit for bit."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 16, requires_grad=True), (1 + 0.1 * torch.randn(16)).requires_grad_()

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return outputs_and_grads(lambda x: rms_norm(x, weight, 1e-6), [x], [weight])

    for ours, ref in zip(run(True), run(False)):
        assert torch.equal(ours, ref)


def test_rms_norm_and_the_fused_projection_stay_in_fp64_for_fp64_inputs():
    """Their statistic is computed in fp32 at least, not in fp32 always: fp64 inputs (gradcheck, numerics work) get
    fp64 results and the analytic gradients to fp64's precision."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    norm_weight = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    weight, bias = torch.randn(5, 8, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, norm_weight))
    fused = lambda x, n, w, b: RMSNormThenLinear.apply(x, n, 1e-6, w, b)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x, norm_weight, weight, bias.requires_grad_()))


SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0, attention_dropout=0.0)
PADDED_FAMILIES = {
    "bert": (BertArch(**SMALL, max_positions=40), "mlm"),
    "roberta": (RobertaArch(**SMALL, max_positions=40), "mlm"),
    "electra": (ElectraArch(**SMALL, embedding_size=16, generator_hidden_size=16, max_positions=40), "rtd"),
    "gpt": (GptArch(**SMALL, max_positions=40), "clm"),
    "bart": (BartArch(**SMALL, num_decoder_layers=2, max_positions=40), "denoise"),
    "t5": (T5Arch(**SMALL, num_decoder_layers=2), "span-corruption"),
}


@pytest.mark.parametrize("family", PADDED_FAMILIES)
def test_a_padded_batch_runs_its_layers_on_its_real_tokens_only_with_the_padded_results(family, monkeypatch):
    """Packed rows (`PackedRows`): the feed-forward layers see the real tokens (and, in a decoder, the positions up
    to the last target) and nothing else, and the states at real tokens, the loss and every gradient equal those of
    the same batch run padded."""
    arch, objective = PADDED_FAMILIES[family]
    monkeypatch.setattr(row_sets, "ROW_BUCKET", 1)  # no rounding of the row count: a toy batch is below one bucket
    torch.manual_seed(0)
    model = PRETRAINING_MODELS[family](arch, 50, ObjectiveConfig(name=objective)).eval()
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:], mask[2, 10:] = 0, 0
    ids = torch.randint(5, 50, (3, 12)) * mask
    targets = torch.randint(5, 50, (3, 9))
    targets[0, 8:], targets[1, 5:] = -100, -100
    rows_seen: list[int] = []
    for m in model.modules():
        if isinstance(m, FeedForward):
            m.register_forward_pre_hook(lambda _, args: rows_seen.append(args[0].shape[:-1].numel()))

    def run():
        model.zero_grad()
        rows_seen.clear()
        if family in ("bart", "t5"):
            loss = model(ids, mask, targets.clamp(min=0), [targets])[0].loss
            states = model.encode(ids, mask)
        else:
            states = model.encoder(ids, None, mask)
            loss = (states * mask[..., None] * torch.linspace(-1, 1, states.shape[-1])).sum()  # real tokens only
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return loss.detach(), states.detach(), grads, list(rows_seen)

    packed = run()
    monkeypatch.setattr(PackedRows, "of", staticmethod(lambda keep: None))  # every layer on the padded batch
    padded = run()
    real, decoder_rows = int(mask.sum()), 8 + 5 + 9
    expected = [real] * 2 + ([decoder_rows] * 2 if family in ("bart", "t5") else [])
    assert packed[3][: len(expected)] == expected
    assert set(padded[3]) == {3 * 12, 3 * 9} - ({3 * 9} if family not in ("bart", "t5") else set())
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1][mask.bool()], padded[1][mask.bool()], atol=1e-5, rtol=1e-5)
    assert len(packed[2]) == len(padded[2])
    for ours, ref in zip(packed[2], padded[2]):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_xlnet_attention_keeps_no_scores_by_distance_with_the_plain_gradients(monkeypatch, autocast):
    """The position product keeps q + u (which the content product keeps too) instead of a q + v of its own, and the
    query stream's column gather keeps its index instead of the (B, nh, M, 2T-1) scores it reads: the same outputs
    and gradients as plain torch ops (bf16 under autocast: no dtype is lost on the way back)."""
    from ptmcli.models import xlnet

    torch.manual_seed(0)
    B, T, C, nh, M = 3, 12, 32, 4, 5
    attention = TwoStreamAttention(C, nh, 0.0).train()
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h, g = torch.randn(B, T, C, requires_grad=True), torch.randn(B, M, C, requires_grad=True)
    query_at = torch.stack([torch.randperm(T)[:M] for _ in range(B)])
    content_mask, query_mask = torch.rand(B, 1, T, T) > 0.3, torch.rand(B, 1, M, T) > 0.3
    sinusoid = relative_sinusoid(T, C, h.device)

    def both_streams(h, g):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h_out, g_out = attention(h, g, content_mask, query_mask, sinusoid, query_at=query_at)
        return torch.cat([h_out, g_out], 1)

    params = list(attention.parameters())
    ours = outputs_and_grads(both_streams, (h, g), params)
    by_distance_shape = (B, nh, M, 2 * T - 1)
    assert by_distance_shape not in [tuple(t.shape) for t in kept_storages(both_streams, h, g)]
    plain_position_product = lambda q_u, v_minus_u, positions: (q_u + v_minus_u[:, None]) @ positions.transpose(-1, -2)  # noqa: E731
    monkeypatch.setattr(xlnet._ByDistance, "apply", plain_position_product)
    monkeypatch.setattr(xlnet._GatherColumns, "apply", lambda x, index: x.gather(-1, index))
    assert by_distance_shape in [tuple(t.shape) for t in kept_storages(both_streams, h, g)]
    plain = outputs_and_grads(both_streams, (h, g), params)
    for a, b in zip(ours, plain):  # bf16 products sum in another order: within 1 % of the tensor's largest value
        tolerance = {"atol": 1e-2 * float(b.abs().max()), "rtol": 0} if autocast else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(a, b, **tolerance)


def test_xlnet_runs_its_query_stream_at_the_targets_only_with_the_full_streams_results():
    """Permutation LM reads the query stream at the targets (1/K of the tokens) only, and no query state depends on
    another position's, so the query stream runs at the target positions gathered into (B, M) (M the most targets
    of a row) and nowhere else: the loss and every gradient equal those of both streams run at every position."""
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["xlnet"](XlnetArch(**SMALL), 50, ObjectiveConfig(name="plm")).train()
    B, T = 3, 12
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 9:] = 0
    ids = torch.randint(5, 50, (B, T)) * mask
    rank = torch.stack([torch.randperm(T) for _ in range(B)])
    target_mask = (rank >= T - 3) & mask.bool()  # the last 3 of each order (fewer in the padded row)
    assert target_mask.sum(1).tolist()[:2] == [3, 3] and target_mask[2].sum() < 3
    rows_seen: list[int] = []
    for m in model.modules():
        if isinstance(m, FeedForward):
            m.register_forward_pre_hook(lambda _, args: rows_seen.append(args[0].shape[:-1].numel()))

    def run(loss_fn):
        model.zero_grad()
        rows_seen.clear()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], list(rows_seen)

    def full_streams():
        _, g = model.encoder.two_stream(ids, mask, rank)
        weight = model.encoder.embeddings.word.weight
        return F.cross_entropy(F.linear(g[target_mask], weight, model.lm_bias), ids[target_mask], reduction="sum")

    targets_only = run(lambda: model(ids, mask, rank, target_mask, ids[target_mask]).loss)
    full = run(full_streams)
    assert targets_only[2] == [B * T, B * 3] * 2  # per layer: the content stream, then the query stream
    assert full[2] == [B * T] * 4
    torch.testing.assert_close(targets_only[0], full[0], atol=1e-5, rtol=1e-5)
    assert len(targets_only[1]) == len(full[1])
    for ours, ref in zip(targets_only[1], full[1]):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


MASKED_LM = {
    "bert": (PADDED_FAMILIES["bert"][0], "mlm"),
    "bert-nsp": (PADDED_FAMILIES["bert"][0], "mlm-nsp"),
    "roberta": PADDED_FAMILIES["roberta"],
    "electra": PADDED_FAMILIES["electra"],
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", MASKED_LM)
def test_the_last_encoder_layer_runs_at_the_masked_positions_only_with_the_full_layers_results(
    name, padded, monkeypatch
):
    """Masked LM reads the last layer's states at the masked positions (and BERT's next-sentence head at the first
    token) only, so that layer's queries, feed-forward and norms run there alone (`QueryRows`), every token still
    a key and value: the loss and every gradient equal those of the last layer run at every position."""
    arch, objective = MASKED_LM[name]
    monkeypatch.setattr(row_sets, "ROW_BUCKET", 1)
    torch.manual_seed(0)
    model = PRETRAINING_MODELS[name.split("-")[0]](arch, 50, ObjectiveConfig(name=objective)).train()
    B, T = 3, 12
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[0, 7:], mask[2, 10:] = 0, 0
    ids = torch.randint(5, 50, (B, T)) * mask
    positions = torch.zeros(B, T, dtype=torch.bool)
    positions[0, [0, 5]], positions[1, [1, 3, 4, 11]], positions[2, 6] = True, True, True  # row 0's first too
    targets = torch.randint(5, 50, (int(positions.sum()),))
    last_ffn = (model.generator if name == "electra" else model.encoder).layers[-1].ffn
    rows_seen: list[int] = []
    last_ffn.register_forward_pre_hook(lambda _, args: rows_seen.append(args[0].shape[:-1].numel()))

    def run():
        model.zero_grad()
        rows_seen.clear()
        torch.manual_seed(1)  # ELECTRA samples its replacements
        out = model(ids, None, mask, positions, targets)
        if name == "electra":
            loss = out["mlm_loss"] + (out["rtd_logits"] * torch.linspace(-1, 1, T)).sum()
        else:
            loss = out["mlm"].loss + (out["nsp_logits"].sum() if "nsp_logits" in out else 0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], list(rows_seen)

    masked = run()
    monkeypatch.setattr(QueryRows, "of", staticmethod(lambda wanted, rows: None))  # the full last layer
    full = run()
    wanted = 7 + (2 if name == "bert-nsp" else 0)  # and the first token of the rows where it is not masked
    assert masked[2][0] == wanted
    assert full[2][0] == (int(mask.sum()) if padded else B * T)
    torch.testing.assert_close(masked[0], full[0], atol=1e-5, rtol=1e-5)
    assert len(masked[1]) == len(full[1])
    for ours, ref in zip(masked[1], full[1]):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_packed_rows_round_their_count_up_to_a_bucket_and_give_back_every_real_token():
    torch.manual_seed(0)
    keep = torch.rand(4, 100) < 0.6
    rows = PackedRows.of(keep)
    assert len(rows.index) % row_sets.ROW_BUCKET == 0 and len(rows.index) - int(keep.sum()) < row_sets.ROW_BUCKET
    x = torch.randn(4, 100, 8)
    back = rows.unpack(rows.pack(x))
    assert torch.equal(back[keep], x[keep])
    assert PackedRows.of(torch.ones(4, 100)) is None
    assert PackedRows.of(torch.rand(2, 50) < 0.6) is None  # a bucket holds every position: nothing to gain


def test_unpacking_rows_keeps_only_their_index_and_passes_the_gradients_back():
    keep = torch.rand(4, 100, generator=torch.Generator().manual_seed(0)) < 0.3
    rows = PackedRows.of(keep)
    x = torch.randn(len(rows.index), 8, requires_grad=True)
    kept = kept_storages(rows.unpack, x)
    assert [tuple(t.shape) for t in kept] == [tuple(rows.index.shape)]  # torch's index_copy keeps x as well
    weights = torch.randn(4, 100, 8)
    (rows.unpack(x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights.reshape(-1, 8)[rows.index])


def test_a_residual_sum_written_into_the_sublayers_output_is_the_plain_sum_with_the_plain_gradients():
    """Written into a fresh output, the sum and every gradient are x + update's bit for bit; a view (a biased
    projection of a 3-D input) or another dtype (autocast) gets a new tensor, as x + update makes it."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, requires_grad=True)
    up, down = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 8, bias=False)
    ffn = lambda t: down(F.relu(up(t), inplace=True))  # noqa: E731  (T5's feed-forward, ReLU in place)
    grad = torch.randn(4, 6, 8)
    plain = x + down(F.relu(up(x)))
    parameters = [x, up.weight, down.weight]
    expected = torch.autograd.grad(plain, parameters, grad)
    update = ffn(x)
    summed = residual(x, update)
    assert summed.data_ptr() == update.data_ptr() and torch.equal(summed, plain)
    for got, want in zip(torch.autograd.grad(summed, parameters, grad), expected):
        assert torch.equal(got, want)

    biased = torch.nn.Linear(8, 8)(x)  # 3-D input with a bias: a view of the product
    assert biased._is_view() and residual(x, biased).data_ptr() != biased.data_ptr()
    half = torch.randn(4, 6, 8, dtype=torch.bfloat16)
    mixed = residual(x, half)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, x + half)


def test_a_norm_fused_with_the_projection_after_it_keeps_no_normalised_copy_with_the_plain_results():
    """`RMSNormThenLinear` (T5's norms, each before one projection): the output and every gradient bit for bit those
    of rms_norm then F.linear, keeping the input, one number per token and the weights."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    norm_weight, weight = (1 + 0.1 * torch.randn(16)).requires_grad_(), torch.randn(24, 16, requires_grad=True)
    for bias in (None, torch.randn(24, requires_grad=True)):
        params = [norm_weight, weight] + ([bias] if bias is not None else [])
        fused = lambda x: RMSNormThenLinear.apply(x, norm_weight, 1e-6, weight, bias)  # noqa: E731
        plain = lambda x: F.linear(rms_norm(x, norm_weight, 1e-6), weight, bias)  # noqa: E731
        for ours, ref in zip(*(outputs_and_grads(fn, [x], params) for fn in (fused, plain))):
            assert torch.equal(ours, ref)
        kept = sorted(t.numel() for t in kept_storages(fused, x))
        assert kept == [15, 16, 3 * 5 * 16, 24 * 16]  # 1 / rms per token, the norm's weight, the input, the weight


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_biased_self_attention_rebuilds_its_weights_with_the_plain_outputs_and_gradients(scale):
    """`BiasedAttention` (T5's self-attention in fp32 without dropout) from a fused projection, with masked keys:
    SDPA's outputs and gradients, keeping q, k and v (the projection's size), the bias and one number per query,
    and no (T x T) attention weights."""
    torch.manual_seed(0)
    B, T, nh, hs = 3, 5, 2, 8
    qkv = torch.randn(B, T, 3 * nh * hs, requires_grad=True)
    relative = torch.randn(1, nh, T, T, requires_grad=True)
    allowed = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]).bool()[:, None, None, :]
    biased = lambda: relative.masked_fill(~allowed, float("-inf"))  # noqa: E731

    def plain(qkv):
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(nh * hs, 2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=biased(), scale=scale)
        return y.transpose(1, 2).reshape(B, T, nh * hs)

    ours = lambda qkv: BiasedAttention.apply(qkv, biased(), nh, scale)  # noqa: E731
    for got, want in zip(*(outputs_and_grads(fn, [qkv], [relative]) for fn in (ours, plain))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kept = sorted(t.numel() for t in kept_storages(ours, qkv) if t.dtype != torch.bool)
    assert kept == [B * nh * T, B * nh * T * T, qkv.numel()]  # log-sum-exps, the masked bias, q k v
    assert torch.autograd.gradcheck(
        lambda qkv, bias: BiasedAttention.apply(qkv, bias, nh, scale),
        (qkv.detach()[:, :3].double().requires_grad_(), biased().detach()[..., :3, :3].double().requires_grad_()),
    )


def _off_fp64(got: list[torch.Tensor], exact: list[torch.Tensor]) -> list[float]:
    return [((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(got, exact)]


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_biased_self_attention_from_a_bf16_projection_computes_its_scores_and_bias_gradient_in_fp32(scale):
    """Under CPU bf16 autocast `BiasedAttention` takes the bf16 projection as it is (and keeps it in bf16): its output
    and the gradient of q, k, v within bf16's rounding of fp64's, as SDPA's (which upcasts everything but casts the bias
    to bf16), and the bias gradient, computed in fp32, to fp32's rounding."""
    torch.manual_seed(0)
    B, T, nh, hs = 3, 16, 2, 8
    qkv = (torch.randn(B, T, 3 * nh * hs) * 2).bfloat16().requires_grad_()
    relative = (torch.randn(1, nh, T, T) * 4).requires_grad_()
    allowed = torch.ones(B, 1, 1, T, dtype=torch.bool)
    allowed[1, ..., 11:] = False

    def heads(x):
        return [t.view(B, T, nh, hs).transpose(1, 2) for t in x.split(nh * hs, 2)]

    def sdpa(qkv, bias):
        y = F.scaled_dot_product_attention(*heads(qkv), attn_mask=bias.to(qkv.dtype), scale=scale)
        return y.transpose(1, 2).reshape(B, T, nh * hs)

    grad = torch.randn(B, T, nh * hs).bfloat16()  # the same gradient, exact in bf16, for every run

    def run(fn, qkv, relative):
        qkv.grad = relative.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(qkv, relative.masked_fill(~allowed, float("-inf")))
        out.backward(grad.to(out.dtype))
        return [out, qkv.grad, relative.grad]

    assert attention_module.weights_rebuilt(qkv, relative, 0.0)  # what T5's self-attention runs in bf16
    ours = run(lambda x, bias: BiasedAttention.apply(x, bias, nh, scale), qkv, relative)
    theirs = run(sdpa, qkv, relative)
    exact = run(sdpa, *(t.detach().double().requires_grad_() for t in (qkv, relative)))
    assert ours[0].dtype == torch.bfloat16
    out, grad_qkv, grad_bias = _off_fp64(ours, exact)
    sdpa_out, sdpa_grad_qkv, sdpa_grad_bias = _off_fp64(theirs, exact)
    # within bf16's rounding (2^-7 relative) of fp64's, as SDPA's are (its bias gradient carries the bias's rounding)
    assert max(out, grad_qkv, sdpa_out, sdpa_grad_qkv) < 2**-7, (out, grad_qkv, sdpa_out, sdpa_grad_qkv)
    assert grad_bias < 1e-5 < sdpa_grad_bias, (grad_bias, sdpa_grad_bias)
    kept = kept_storages(lambda x: BiasedAttention.apply(x, relative, nh, scale), qkv)
    assert sorted((t.numel(), t.dtype) for t in kept) == sorted(
        [(B * nh * T, torch.float32), (nh * T * T, torch.float32), (qkv.numel(), torch.bfloat16)]
    )  # log-sum-exps, the bias, q k v in the projection's dtype


@pytest.mark.parametrize("backward_follows", [False, True])
@pytest.mark.parametrize("case", ["cross, padded keys", "causal self"])
def test_bf16_attention_with_gradients_on_a_cpu_has_fp32_weights_as_close_as_the_fused_kernel(case, backward_follows):
    """Under CPU bf16 autocast, attention without dropout whose inputs need gradients runs `RebuiltAttention` (the
    fused kernel's backward pass is slow there), or with `backward_follows` the same left to autograd, its scores and
    softmax in fp32: outputs and gradients within bf16's rounding of fp64's, as the fused kernel's, and the former
    keeps no attention weights; without gradients the fused kernel itself serves."""
    torch.manual_seed(0)
    B, nh, hs = 3, 2, 8
    queries, keys = (5, 12) if case.startswith("cross") else (12, 12)
    q, k, v = ((torch.randn(B, nh, n, hs) * 2).bfloat16().requires_grad_() for n in (queries, keys, keys))
    mask, causal = None, case == "causal self"
    if not causal:
        mask = torch.ones(B, 1, 1, keys, dtype=torch.bool)
        mask[0, ..., 9:] = False

    def ours(*qkv):
        return attention(*qkv, mask, 0.0, causal, 1.0, backward_follows)

    def run(fn, *inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return outputs_and_grads(fn, inputs, [])

    fused = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, is_causal=causal, scale=1.0)
    exact = run(fused, *(t.detach().double().requires_grad_() for t in (q, k, v)))
    mine, theirs = run(ours, q, k, v), run(fused, q, k, v)
    assert mine[0].dtype == torch.bfloat16 and not torch.equal(mine[0], theirs[0])  # not the fused kernel
    assert max(_off_fp64(mine, exact) + _off_fp64(theirs, exact)) < 2**-7  # bf16's rounding, relative
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = kept_storages(ours, q, k, v)
    weights = [t.shape for t in kept if t.dim() == 4 and t.shape[0] == B and t.shape[-2:] == (queries, keys)]
    assert bool(weights) == backward_follows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(q, k, v), fused(q, k, v))


def test_cross_attention_projects_the_memory_again_in_the_backward_pass_with_the_kept_results():
    """In training, the keys and values of the encoder's states are projected again in the backward pass
    (`ProjectedInBackward`): outputs and gradients bit for bit those of the path that keeps them (a decoding cache's),
    and nothing the size of the projection is kept. With attention dropout they are kept, as without
    `recompute_memory` (BART)."""
    torch.manual_seed(0)
    cross = CrossAttention(32, 4, 0.0, recompute_memory=True)
    x, memory = torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 7, 32, requires_grad=True)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    params = list(cross.parameters())
    results = [
        outputs_and_grads(lambda x, m: cross(x, m, mask, cache=cache), [x, memory], params) for cache in (None, {})
    ]
    for ours, kept in zip(*results):
        assert torch.equal(ours, kept)
    projection = 3 * 7 * 64

    def largest_kept():
        kept = kept_storages(lambda x, m: cross(x, m, mask), x, memory)
        return max(t.numel() for t in kept if not isinstance(t, torch.nn.Parameter))

    assert largest_kept() < projection
    cross.dropout = 0.1
    assert largest_kept() >= projection
    cross.dropout, cross.recompute_memory = 0.0, False
    assert largest_kept() >= projection


def tiny_t5_step(examples: int, inputs: int, targets: int, padded_from: int):
    """A tiny T5 and one step of it on fixed random batches (the second example's input padded from `padded_from`):
    returns the forward pass (the loss) and the step (the loss and every gradient)."""
    arch, objective = PADDED_FAMILIES["t5"]
    torch.manual_seed(0)
    model = PRETRAINING_MODELS["t5"](arch, 97, ObjectiveConfig(name=objective))
    ids, decoder_ids = torch.randint(0, 97, (examples, inputs)), torch.randint(0, 97, (examples, targets))
    attention_mask = torch.ones(examples, inputs, dtype=torch.long)
    attention_mask[1, padded_from:] = 0
    forward = lambda: model(ids, attention_mask, decoder_ids, [decoder_ids.roll(-1, 1)])[0].loss  # noqa: E731

    def step():
        model.zero_grad()
        loss = forward()
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in model.parameters())]

    return forward, step


def test_t5_keeps_less_with_the_plain_loss_and_gradients(monkeypatch):
    """A T5 step with its norms fused into the projections, its self-attention weights rebuilt and its cross-attention
    keys and values projected again: the loss and every gradient of the straightforward layers, at least a third
    less kept between the passes."""
    forward, step = tiny_t5_step(4, 12, 6, 9)

    def kept_bytes():
        kept = kept_storages(forward)
        return sum(t.untyped_storage().nbytes() for t in kept if not isinstance(t, torch.nn.Parameter))

    lean, lean_kept = step(), kept_bytes()
    monkeypatch.setattr(attention_module, "weights_rebuilt", lambda *a: False)
    plain_projection = lambda linear, x, norm: linear(x if norm is None else norm(x))  # noqa: E731
    for module in (attention_module, layers):
        monkeypatch.setattr(module, "normed_projection", plain_projection)
    kept_projection = lambda consume, x, m, w, b: consume(x, F.linear(m, w, b))  # noqa: E731
    monkeypatch.setattr(attention_module.ProjectedInBackward, "apply", kept_projection)
    plain, plain_kept = step(), kept_bytes()
    for ours, ref in zip(lean, plain):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert lean_kept < 0.67 * plain_kept, (lean_kept, plain_kept)
