"""Several fine-tuning tasks trained as one: their examples served by a mixture of the tasks' batch orders, and
their losses, statistics and metrics kept apart under `NAME/` prefixes, so the loop sees one objective."""

from __future__ import annotations

import itertools

import numpy as np

from ptmcli.data.batches import MixtureOrder
from ptmcli.errors import PtmError
from ptmcli.models.heads import HeadView
from ptmcli.schema import MixtureConfig
from ptmcli.tasks.common import EncodedExamples


def mixture_weights(sizes: dict[str, int], cfg: MixtureConfig) -> dict[str, float]:
    """How often each task's batches are drawn: proportional to its training examples (T5's examples-proportional
    mixing), to examples^(1/temperature) (temperature-scaled mixing), or equally."""
    if cfg.sampling == "equal":
        raw = {name: 1.0 for name in sizes}
    elif cfg.sampling == "temperature":  # above 0, as check_finetune made sure
        raw = {name: n ** (1.0 / cfg.temperature) for name, n in sizes.items()}
    else:
        raw = {name: float(n) for name, n in sizes.items()}
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def prefixed(name: str, keys) -> tuple[str, ...]:
    return tuple(f"{name}/{key}" for key in keys)


class MultiTaskExamples:
    """One split of every task, indexed one after the other. A batch holds one task's examples only (tagged with
    batch["task"]); its counts name every task's terms, zero for the others."""

    def __init__(self, parts: dict[str, EncodedExamples], terms: dict[str, tuple[str, ...]], weights: dict | None):
        self.parts, self.terms, self.weights = parts, terms, weights
        self.names = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in parts.values())])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def order(self, batch_size: int, world_size: int, rank: int, seed: int) -> MixtureOrder:
        if self.weights is None:
            raise PtmError("Only a training split is drawn by mixture.")  # a programming error, not a user's
        try:
            return MixtureOrder(
                [len(p) for p in self.parts.values()],
                [self.weights[n] for n in self.names],
                batch_size,
                world_size,
                rank,
                seed,
            )
        except PtmError as err:
            raise PtmError(f"Multi-task run: {err}") from None

    def batch(self, indices: list[int], epoch: int) -> dict:
        which = int(np.searchsorted(self.offsets, indices[0], side="right")) - 1
        name, start = self.names[which], int(self.offsets[which])
        batch = self.parts[name].batch([i - start for i in indices], epoch)
        own = batch["counts"]
        batch["counts"] = {
            f"{task}/{term}": own[term] if task == name else 0 for task in self.names for term in self.terms[task]
        }
        batch["task"] = name
        return batch

    def eval_ranges(self, batch_size: int) -> list[tuple[int, int]]:
        """Each task's evaluation batches, taken in turn from the tasks, so that trainer.eval_batches=N sees them
        all."""
        per_task = [
            [(start + int(offset), stop + int(offset)) for start, stop in part.eval_ranges(batch_size) if stop > start]
            for part, offset in zip(self.parts.values(), self.offsets)
        ]
        return [r for turn in itertools.zip_longest(*per_task) for r in turn if r is not None]


class MultiTask:
    """The tasks as one objective. `scores` names each task's own metric (its trainer.metric), whose mean over the
    tasks is the `mean` metric; `routed`: the model takes task=NAME (encoder + heads), else every task calls the
    one model as it is (an encoder-decoder writing every task's answers)."""

    def __init__(self, tasks: dict, scores: dict[str, str], routed: bool):
        self.tasks, self.scores, self.routed = tasks, scores, routed
        self.terms = tuple(t for name, task in tasks.items() for t in prefixed(name, task.terms))
        self.stats = tuple(s for name, task in tasks.items() for s in prefixed(name, task.stats))
        self.term_weights = {
            f"{name}/{t}": w for name, task in tasks.items() for t, w in getattr(task, "term_weights", {}).items()
        }

    def task_terms(self) -> dict[str, tuple[str, ...]]:
        return {name: task.terms for name, task in self.tasks.items()}

    def view(self, model, name: str):
        return HeadView(model, name) if self.routed else model

    def examples(self, splits: dict[str, list[dict]], weights: dict[str, float] | None) -> MultiTaskExamples:
        parts = {name: task.examples(splits[name]) for name, task in self.tasks.items()}
        return MultiTaskExamples(parts, self.task_terms(), weights)

    def __call__(self, model, batch: dict) -> tuple[dict, dict]:
        name = batch["task"]
        own_sums, own_stats = self.tasks[name](self.view(model, name), batch)
        zero = next(iter(own_sums.values())).new_zeros(())
        sums = {t: own_sums[t.partition("/")[2]] if t.startswith(name + "/") else zero for t in self.terms}
        if model.training:
            return sums, {}
        stats = {s: own_stats[s.partition("/")[2]] if s.startswith(name + "/") else 0 for s in self.stats}
        return sums, stats

    def metrics(self, sums: dict, counts: dict, stats: dict) -> dict[str, float]:
        """Every task's metrics as NAME/metric (tasks with nothing evaluated are left out), `loss` the sum of the
        tasks' losses and `mean` the mean of their own metrics."""
        out, per_task = {}, {}
        for name, task in self.tasks.items():
            own = {k: v for k, v in counts.items() if k.startswith(name + "/")}
            if not any(own.values()):
                continue

            def part(values: dict, name: str = name) -> dict:
                return {k.partition("/")[2]: v for k, v in values.items() if k.startswith(name + "/")}

            per_task[name] = task.metrics(part(sums), part(counts), part(stats))
        for name, metrics in per_task.items():
            if self.scores[name] not in metrics:
                raise PtmError(
                    f"tasks.{name}.trainer.metric=val/{self.scores[name]} is not a metric of this task; choose one "
                    f"of {', '.join('val/' + k for k, v in metrics.items() if isinstance(v, float))}."
                )
        if per_task:
            out["loss"] = sum(m["loss"] for m in per_task.values())
            out["mean"] = float(np.mean([m[self.scores[name]] for name, m in per_task.items()]))
        for name, metrics in per_task.items():
            out.update({f"{name}/{k}": v for k, v in metrics.items()})
        return out

    @staticmethod
    def task_metrics(metrics: dict, name: str) -> dict:
        """One task's metrics out of the prefixed ones."""
        return {k.partition("/")[2]: v for k, v in metrics.items() if k.startswith(name + "/")}
