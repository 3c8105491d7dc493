"""Multi-task fine-tuning: `ptm finetune task=[news-cls,sentiment]` trains one encoder with a head per task, batches
drawn from the tasks by a seeded mixture; it evaluates, predicts and resumes per task."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from ptmcli.data.batches import BatchOrder, MixtureOrder
from ptmcli.schema import MixtureConfig
from ptmcli.tasks.multitask import MultiTask, MultiTaskExamples, mixture_weights
from tests.conftest import comparable, fails_with, read_metrics, rewound, run_ptm
from tests.test_finetune_cli import SMALL as ONE_TASK

# MiniLM on 160 news articles and 160 film reviews, 32 tokens each: one encoder, two heads (~25 s on 2 cores)
SMALL = [
    "task=[news-cls,sentiment]",
    *(f"tasks.{t}.data.max_train_samples=160" for t in ("news-cls", "sentiment")),
    *(f"tasks.{t}.task.max_seq_len=32" for t in ("news-cls", "sentiment")),
    "tasks.sentiment.data.validation_fraction=0.02",  # ~250 reviews each to score, as many as news articles
    "tasks.sentiment.data.test_fraction=0.02",
    *(a for a in ONE_TASK if not a.startswith(("data.", "task."))),  # the single-task tests' budget: 20 steps of 8
    "trainer.save_every=10",
    "trainer.keep_last=0",
]


def test_mixture_weights_follow_the_sampling_rule():
    sizes = {"a": 900, "b": 100}
    assert mixture_weights(sizes, MixtureConfig("proportional")) == pytest.approx({"a": 0.9, "b": 0.1})
    assert mixture_weights(sizes, MixtureConfig("equal")) == pytest.approx({"a": 0.5, "b": 0.5})
    # temperature 2: square roots, 30 : 10
    assert mixture_weights(sizes, MixtureConfig("temperature", 2.0)) == pytest.approx({"a": 0.75, "b": 0.25})


def test_mixture_order_depends_only_on_the_batch_number():
    sizes, probs = [40, 24], [0.7, 0.3]
    order = MixtureOrder(sizes, probs, 4, 1, 0, seed=3)
    batches = [order(k) for k in range(2000)]
    # a batch comes whole from one task (indices 0..39 are the first task, 40..63 the second)
    assert all(len({i >= 40 for i in idx}) == 1 for _, idx in batches)
    share = Counter(idx[0] >= 40 for _, idx in batches)[True] / len(batches)
    assert share == pytest.approx(0.3, abs=0.03)
    # resuming at batch k (a fresh object, jumping far ahead first) gives the same batches
    fresh = MixtureOrder(sizes, probs, 4, 1, 0, seed=3)
    assert [fresh(k) for k in (1999, 5, 1000)] == [batches[1999], batches[5], batches[1000]]
    # within a task, its batches are its own BatchOrder: every example once per epoch of that task
    second = [idx for _, idx in batches if idx[0] >= 40][:6]
    assert sorted(i - 40 for idx in second for i in idx) == list(range(24))
    # two processes with half the batch see exactly what one process sees
    halves = [MixtureOrder(sizes, probs, 2, 2, rank, seed=3) for rank in (0, 1)]
    assert all(halves[0](k)[1] + halves[1](k)[1] == batches[k][1] for k in range(50))


class _Counting:
    """A task whose loss is its batch size and whose metric is a count (the bookkeeping does not depend on text)."""

    terms, stats = ("cls",), ("seen",)

    def __init__(self, score: float):
        self.score = score

    def __call__(self, model, batch):
        n = torch.tensor(float(len(batch["rows"])))
        return {"cls": n}, {"seen": n}

    def metrics(self, sums, counts, stats):
        return {"loss": sums["cls"] / counts["cls"], "accuracy": self.score, "seen": stats["seen"]}


class _Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, indices, epoch):
        return {"rows": indices, "counts": {"cls": len(indices)}}

    def eval_ranges(self, batch_size):
        return [(s, min(s + batch_size, self.n)) for s in range(0, self.n, batch_size)]


def test_multitask_objective_keeps_the_tasks_apart_and_averages_their_metric():
    from ptmcli.loop import evaluate

    tasks = {"a": _Counting(0.8), "b": _Counting(0.4)}
    objective = MultiTask(tasks, {"a": "accuracy", "b": "accuracy"}, routed=False)
    examples = MultiTaskExamples({"a": _Rows(10), "b": _Rows(3)}, objective.task_terms(), None)
    # evaluation batches alternate between the tasks, so that trainer.eval_batches=N sees every task
    assert [examples.batch(list(range(s, e)), 0)["task"] for s, e in examples.eval_ranges(4)] == ["a", "b", "a", "a"]
    hw = type("Hw", (), {"device": torch.device("cpu"), "autocast": lambda self: torch.autocast("cpu", enabled=False)})
    metrics = evaluate(objective, torch.nn.Identity(), examples, 4, 0, hw(), _OneProcess())
    assert metrics["a/seen"] == 10 and metrics["b/seen"] == 3 and metrics["a/loss"] == 1.0
    assert metrics["mean"] == pytest.approx(0.6) and metrics["loss"] == 2.0
    # with one evaluation batch only task a is seen: b is left out, not scored as zero
    assert "b/accuracy" not in evaluate(objective, torch.nn.Identity(), examples, 4, 1, hw(), _OneProcess())


class _OneProcess:
    world_size, rank = 1, 0

    def sum(self, tensor):
        return tensor


@pytest.fixture(scope="module")
def multi_run(cache_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("multitask") / "run"
    out = run_ptm(["finetune", *SMALL, f"hydra.run.dir={run}"], cache_env)
    return run, out


def test_one_encoder_learns_two_tasks_and_serves_each(multi_run, cache_env, tmp_path):
    run, out = multi_run
    test = json.loads((run / "test_metrics.json").read_text())
    # news topics: chance ~0.2; 10 batches of 8 articles from MiniLM already sort most of them
    assert test["news-cls/accuracy"] > 0.45, test
    assert test["sentiment/loss"] < 0.75 and len(test["sentiment/confusion_matrix"]) == 2
    assert test["mean"] == pytest.approx((test["news-cls/accuracy"] + test["sentiment/accuracy"]) / 2)
    assert json.loads((run / "labels.json").read_text())["sentiment"] == ["fresh", "rotten"]
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["news-cls"]["train"]) == len(splits["sentiment"]["train"]) == 160
    train_rows = [r for r in read_metrics(run) if r["split"] == "train"]
    assert all("news-cls/cls_loss" in r and "sentiment/cls_loss" in r for r in train_rows)
    text = " ".join(out.stderr.split())
    assert "2 tasks from" in text and "50% of batches" in text
    info = json.loads((run / "run.json").read_text())
    assert info["parameters"]["total"] == 22_713_216 + 384 * 7 + 7  # MiniLM + two heads (5 and 2 labels)

    evaluated = json.loads(run_ptm(["evaluate", f"run={run}"], cache_env).stdout.strip().splitlines()[-1])
    assert evaluated["news-cls/accuracy"] == pytest.approx(test["news-cls/accuracy"])
    one = json.loads(run_ptm(["evaluate", f"run={run}", "task=sentiment"], cache_env).stdout.strip().splitlines()[-1])
    assert one["sentiment/accuracy"] == pytest.approx(test["sentiment/accuracy"]) and "news-cls/loss" not in one
    texts = tmp_path / "texts.txt"
    texts.write_text("The striker scored twice as the club won the cup final.\nA tedious, joyless film.\n")
    rows = [
        json.loads(x)
        for x in run_ptm(["predict", f"run={run}", f"input={texts}", "task=news-cls"], cache_env).stdout.splitlines()
    ]
    assert [set(r["scores"]) for r in rows] == [{"business", "entertainment", "politics", "sports", "tech"}] * 2
    fails_with(["predict", f"run={run}", f"input={texts}"], cache_env, "say which task predicts, e.g. task=news-cls")
    fails_with(["predict", f"run={run}", f"input={texts}", "task=sentimnt"], cache_env, "Did you mean 'sentiment'")
    fails_with(["export", f"run={run}"], cache_env, "is a multi-task run")


def test_multitask_resume_is_exact(multi_run, cache_env, tmp_path):
    run, _ = multi_run
    resumed = rewound(run, tmp_path / "resumed", 20, 10)
    run_ptm(["finetune", *SMALL, f"hydra.run.dir={resumed}", "resume=auto"], cache_env)
    assert comparable(read_metrics(resumed)) == comparable(read_metrics(run))


@pytest.mark.parametrize(
    "args,expected",
    [
        (["task=[news-cls,sentimnt]"], "'sentimnt' is not a task. Did you mean 'sentiment'?"),
        (["task=[news-cls,news-cls]"], "names 'news-cls' twice"),
        (["task=[news-cls,sentiment]", "task.max_seq_len=64"], "tasks.sentiment.task.max_seq_len=64"),
        (["task=[news-cls,sentiment]", "tasks.news-cls.task.max_seq_lenn=64"], "Did you mean 'max_seq_len'?"),
        (["task=[news-cls,sentiment]", "tasks.ner.task.max_seq_len=64"], "this run's tasks are news-cls, sentiment"),
        (["task=[news-cls,sentiment]", "mixture.sampling=sqrt"], "mixture.sampling"),
        (["task=[news-cls,sentiment]", "mixture.temperature=0"], "must be above 0"),
    ],
)
def test_bad_multitask_command_lines_are_refused_in_one_sentence(args, expected, cache_env, tmp_path):
    fails_with(["finetune", *args, f"hydra.run.dir={tmp_path / 'x'}"], cache_env, expected)
    assert not (tmp_path / "x").exists()


def test_every_example_of_each_task_is_drawn_once_per_task_epoch():
    """The proportional mixture over 2 tasks of 12 and 36 examples: after 3 full epochs of the second task, each of
    its examples has been drawn exactly 3 times (a task's own order is a per-epoch permutation)."""
    order = MixtureOrder([12, 36], [0.25, 0.75], 4, 1, 0, seed=0)
    drawn = []
    for k in range(400):
        _, idx = order(k)
        if idx[0] >= 12:
            drawn += idx
        if len(drawn) == 3 * 36:
            break
    assert Counter(drawn) == dict.fromkeys(range(12, 48), 3)
    assert BatchOrder(36, 4, 1, 0, 1)(0)[1] != BatchOrder(36, 4, 1, 0, 2)(0)[1]  # tasks shuffle independently
    assert np.isclose(sum(mixture_weights({"a": 3, "b": 5}, MixtureConfig()).values()), 1.0)
