"""`ptm finetune`, `ptm evaluate` and `ptm predict` through the real CLI, on real data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, comparable, fails_with, read_metrics, rewound, run_commands, run_ptm

# what each run command does with a fine-tuning run of an encoder: all work but generate, which refuses in a sentence
ENCODER_RUN = {"evaluate": 0, "predict": 0, "generate": 2, "export": 0}
KINDS = {"ner": "token-cls", "qa": "qa", "pair-cls": "pair-cls", "news-cls": "text-cls"}

# MiniLM on a seeded 160-article sample of BBC News, the first 32 tokens of each (headline and lead): ~25 s on one
# core, test accuracy ~0.86 with full fine-tuning and ~0.83 with LoRA or prefix tuning.
SMALL = [
    "data.max_train_samples=160",
    "task.max_seq_len=32",
    "trainer.epochs=null",
    "trainer.max_steps=20",
    "trainer.batch_size=8",
    "trainer.eval_every=10",
    "trainer.log_every=5",
    "trainer.eval_batches=4",
    "optimizer.lr=2e-4",
    "hardware=cpu",
    "trainer.curves=false",  # pictures are tested on their own (tests/test_runs.py)
]


@pytest.fixture(scope="module")
def news_run(cache_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("finetune") / "news"
    out = run_ptm(
        ["finetune", "task=news-cls", *SMALL, "trainer.save_every=10", "trainer.keep_last=0", f"hydra.run.dir={run}"],
        cache_env,
    )
    return run, out


def test_minilm_news_classification_beats_chance(news_run):
    run, out = news_run
    test = json.loads((run / "test_metrics.json").read_text())
    # 5 balanced-ish topics: chance is ~0.2; 20 steps of 16 articles from MiniLM must do far better
    assert test["accuracy"] > 0.6, test
    assert len(test["confusion_matrix"]) == 5 and "f1_sports" in test
    assert json.loads((run / "labels.json").read_text()) == ["business", "entertainment", "politics", "sports", "tech"]
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["train"]) == 160 and not set(splits["train"]) & set(splits["test"])
    info = json.loads((run / "run.json").read_text())
    assert info["parameters"]["trainable"] == info["parameters"]["total"] > 22_000_000
    assert (run / "checkpoints" / "best").is_symlink() and "confusion matrix" in out.stderr
    val = [r for r in read_metrics(run) if r["split"] == "val"]
    best_step = int((run / "checkpoints" / "best").resolve().name.split("-")[1])
    assert max(r["accuracy"] for r in val) == next(r["accuracy"] for r in val if r["step"] == best_step)


def test_evaluate_and_predict_round_trip(news_run, cache_env, tmp_path):
    run, _ = news_run
    out = run_ptm(["evaluate", f"run={run}", "split=test", "batch_size=3"], cache_env)
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(json.loads((run / "test_metrics.json").read_text())["accuracy"])
    fails_with(["evaluate", f"run={run}", "pooling=cls"], cache_env, "pooling= applies to a retrieval task")
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "The striker scored twice as the club won the cup final.\n"
        "Shares in the bank fell after profits dropped and the chief executive resigned.\n"
    )
    out = run_ptm(["predict", f"run={run}", f"input={texts}"], cache_env)
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["text"][:12] for r in rows] == ["The striker ", "Shares in th"]
    assert all(set(r["scores"]) == {"business", "entertainment", "politics", "sports", "tech"} for r in rows)
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in rows)


def test_two_stage_fine_tuning_keeps_the_head_only_for_the_same_labels(news_run, cache_env, tmp_path):
    """init= a fine-tuning run: its encoder, and its head when the task kind and labels are the same. One step at
    a negligible learning rate must then score what the first run scored on the same test split."""
    run, _ = news_run
    second = tmp_path / "second"
    out = run_ptm(
        ["finetune", "task=news-cls", *SMALL, f"init={run}", "trainer.max_steps=1", "optimizer.lr=1e-12"]
        + ["trainer.eval_every=0", "trainer.save_every=0", f"hydra.run.dir={second}"],
        cache_env,
    )
    assert "its head too (same task kind and labels)" in " ".join(out.stderr.split())
    first_test = json.loads((run / "test_metrics.json").read_text())
    second_test = json.loads((second / "test_metrics.json").read_text())
    assert second_test["confusion_matrix"] == first_test["confusion_matrix"]


def test_finetune_resume_is_exact(news_run, cache_env, tmp_path):
    run, _ = news_run
    resumed = rewound(run, tmp_path / "resumed", 20, 10)
    run_ptm(
        [
            "finetune",
            "task=news-cls",
            *SMALL,
            "trainer.save_every=10",
            "trainer.keep_last=0",
            f"hydra.run.dir={resumed}",
            "resume=auto",
        ],
        cache_env,
    )
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(run))


@pytest.fixture(scope="module")
def tiny_pretrained(cache_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained") / "tiny"
    run_ptm(["pretrain", *TINY, "trainer.max_steps=30", f"hydra.run.dir={run}"], cache_env)
    return run


@pytest.mark.parametrize("task,metric", [("ner", "f1"), ("qa", "f1"), ("pair-cls", "accuracy")])
def test_every_task_runs_from_a_ptm_checkpoint(task, metric, tiny_pretrained, cache_env, tmp_path):
    run = tmp_path / task
    run_ptm(
        [
            "finetune",
            f"task={task}",
            f"init={tiny_pretrained}",
            "data.max_train_samples=64",
            "trainer.epochs=null",
            "trainer.max_steps=4",
            "trainer.batch_size=8",
            "trainer.eval_batches=2",
            "trainer.eval_every=2",
            "task.max_seq_len=64",
            f"hydra.run.dir={run}",
            "transfer=partial",
            "transfer.freeze_layers=1",
        ],
        cache_env,
    )
    test = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= test[metric] <= 1.0 and test["loss"] > 0
    info = json.loads((run / "run.json").read_text())
    assert info["parameters"]["trainable"] < info["parameters"]["total"]  # embeddings + 1 layer frozen
    assert run_commands(run, KINDS[task], tmp_path) == ENCODER_RUN


def test_frozen_backbone_trains_only_the_head(tiny_pretrained, cache_env, tmp_path):
    run = tmp_path / "frozen"
    run_ptm(
        [
            "finetune",
            "task=news-cls",
            f"init={tiny_pretrained}",
            "transfer=frozen",
            *SMALL[:2],
            "trainer.epochs=null",
            "trainer.max_steps=3",
            f"hydra.run.dir={run}",
        ],
        cache_env,
    )
    info = json.loads((run / "run.json").read_text())
    assert info["parameters"]["trainable"] == 64 * 5 + 5  # the linear head over 64-wide features
    assert run_commands(run, "text-cls", tmp_path) == ENCODER_RUN


def test_run_commands_on_a_pretraining_run(tiny_pretrained, tmp_path, capsys):
    """A masked-LM pretraining run exports; evaluate and predict (fine-tuning runs) and generate (causal LM or
    text-to-text runs) refuse it in one sentence that says what to do instead."""
    statuses = run_commands(tiny_pretrained, "pretraining", tmp_path)
    assert statuses == {"evaluate": 2, "predict": 2, "generate": 2, "export": 0}
    err = capsys.readouterr().err
    assert "is a pretraining run" in err and "needs a causal LM" in err and "Traceback" not in err


def test_finetune_errors(cache_env, tmp_path):
    fails_with(["finetune", f"init={tmp_path}", f"hydra.run.dir={tmp_path / 'a'}"], cache_env, "is not a checkpoint")
    csv = tmp_path / "mine.csv"
    csv.write_text("body,topic\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20)))
    fails_with(
        [
            "finetune",
            "task=text-cls",
            f"data.train={csv}",
            "data.label_column=topic",
            f"hydra.run.dir={tmp_path / 'b'}",
        ],
        cache_env,
        "data.text_column='text' is not a column",
    )
    fails_with(["finetune", "task=text-cls", f"hydra.run.dir={tmp_path / 'c'}"], cache_env, "data.train is not set")
    fails_with(["finetune", "task=news-cls", "transfer.freze_layers=2"], cache_env, "Did you mean 'freeze_layers'?")
    fails_with(["finetune", "task=news-clss"], cache_env, "Did you mean 'news-cls'?")
    fails_with(["evaluate", f"run={tmp_path}"], cache_env, "is not a ptm run directory: it has no config.yaml")


def test_exported_classifier_serves_the_same_predictions_in_a_pipeline(news_run, cache_env, tmp_path):
    """ptm export format=hf of a news-cls run -> transformers' text-classification pipeline: same labels and scores."""
    transformers = pytest.importorskip("transformers")
    run, _ = news_run
    texts = [
        "The minister said the election would be held in May.",
        "The striker scored twice as the team won the cup final.",
        "Shares in the chip maker rose after strong quarterly profits.",
    ]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    ours = [
        json.loads(line)
        for line in run_ptm(["predict", f"run={run}", f"input={tmp_path / 'texts.txt'}"], cache_env).stdout.splitlines()
    ]
    out = run_ptm(["export", f"run={run}", f"output={tmp_path / 'hf'}"], cache_env)  # format=hf is the default
    assert "BertForSequenceClassification" in out.stderr
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "hf"), top_k=None)
    for mine, theirs in zip(ours, classify(texts)):
        best = max(theirs, key=lambda s: s["score"])
        assert best["label"] == mine["label"]
        assert all(abs(s["score"] - mine["scores"][s["label"]]) < 1e-4 for s in theirs)
