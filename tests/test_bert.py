"""BERT forward: shapes, padding invariance, tied MLM decoder, masked-position head equals the full head."""

from __future__ import annotations

import torch

from ptmcli.models.bert import BertForPretraining
from ptmcli.schema import BertArch

ARCH = BertArch(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_positions=40,
    dropout=0.0,
    attention_dropout=0.0,
)


def _model(nsp=True):
    torch.manual_seed(0)
    return BertForPretraining(ARCH, vocab_size=50, nsp=nsp).eval()


def test_shapes():
    model = _model()
    ids = torch.randint(5, 50, (3, 17))
    hidden = model.encoder(ids)
    assert hidden.shape == (3, 17, 32)
    out = model(ids, torch.zeros_like(ids), torch.ones_like(ids), mlm_positions=ids > 30)
    assert out["mlm_logits"].shape == (int((ids > 30).sum()), 50) and out["nsp_logits"].shape == (3, 2)


def test_padding_does_not_change_real_tokens():
    model = _model()
    ids = torch.randint(5, 50, (2, 9))
    types = torch.randint(0, 2, (2, 9))
    base = model.encoder(ids, types, torch.ones_like(ids))
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 6)], 1).long()
    out = model.encoder(padded, torch.cat([types, torch.zeros(2, 6, dtype=torch.long)], 1), mask)
    torch.testing.assert_close(out[:, :9], base, atol=1e-5, rtol=1e-5)
    # a row of a batch gives the same result with or without a longer, padded neighbour
    short, long_ = torch.randint(5, 50, (1, 4)), torch.randint(5, 50, (1, 9))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long_])
    mask = torch.tensor([[1] * 4 + [0] * 5, [1] * 9])
    torch.testing.assert_close(model.encoder(batch, None, mask)[0, :4], model.encoder(short)[0], atol=1e-5, rtol=1e-5)


def test_mlm_decoder_is_tied_and_only_masked_positions_are_projected():
    model = _model(nsp=False)
    assert model.mlm_head.word_embeddings.weight is model.encoder.embeddings.word.weight
    assert model.nsp_head is None and model.encoder.pooler is None
    ids = torch.randint(5, 50, (2, 11))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, 3] = positions[1, 7] = True
    full = model.mlm_head(model.encoder(ids))
    picked = model(ids, mlm_positions=positions)["mlm_logits"]
    torch.testing.assert_close(picked, full[positions])


def test_sizes_come_from_the_config():
    n = sum(p.numel() for p in BertForPretraining(BertArch(), 30522, nsp=True).parameters())
    assert 11_000_000 < n < 11_500_000  # BERT-mini with a 30,522 vocabulary: 11.2M
