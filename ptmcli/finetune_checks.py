"""The checks that turn a composed fine-tuning config into typed dataclasses: each section, the transfer method's
keys, init vs model, a multi-task run's tasks, and supervised SimCSE's needs. No torch here (the CLI calls it
before anything heavy loads)."""

from __future__ import annotations

from typing import Any, Optional

from ptmcli.errors import PtmError
from ptmcli.schema import (
    DEFAULT_INIT,
    FINETUNE_SECTIONS,
    TRANSFER_SCHEMAS,
    FinetuneConfig,
    FinetuneTrainerConfig,
    LabeledDataConfig,
    OptimizerConfig,
    TaskConfig,
    TaskEntry,
    check_top_keys,
    model_schema,
)
from ptmcli.typecheck import check_section, coerce, did_you_mean


def check_finetune(cfg: dict) -> FinetuneConfig:
    """Turn a composed fine-tuning config into typed dataclasses."""
    check_top_keys(cfg, FinetuneConfig)
    sections = {name: check_section(name, cfg.get(name) or {}, schema) for name, schema in FINETUNE_SECTIONS.items()}
    transfer = cfg.get("transfer") or {"mode": "full"}
    mode = transfer.get("mode") if isinstance(transfer, dict) else None
    if mode not in TRANSFER_SCHEMAS:
        raise PtmError(
            f"transfer.mode={mode!r} is not a transfer method; valid: {', '.join(TRANSFER_SCHEMAS)}."
            + did_you_mean(str(mode), TRANSFER_SCHEMAS)
        )
    sections["transfer"] = check_section("transfer", transfer, TRANSFER_SCHEMAS[mode])
    scalars = {k: coerce(cfg.get(k), Optional[str], k) for k in ("init", "tokenizer", "resume")}
    if scalars["init"] == "auto":  # the default: MiniLM, unless an architecture was picked to train from scratch
        scalars["init"] = None if cfg.get("model") else DEFAULT_INIT
    elif scalars["init"] in ("none", "null", "scratch"):
        scalars["init"] = None
    elif cfg.get("model"):
        raise PtmError(
            f"model={cfg['model'].get('family', '?') if isinstance(cfg['model'], dict) else cfg['model']} picks an "
            f"architecture to train from scratch, but init={scalars['init']} brings its own; drop one of them."
        )
    model = None
    if scalars["init"] is None:
        if not cfg.get("model"):
            raise PtmError(
                "init=none trains from scratch and needs an architecture: add model=NAME (e.g. model=bert-mini)."
            )
        model = check_section("model", cfg["model"], model_schema(cfg["model"]))
    out = FinetuneConfig(model=model, **scalars, **sections, tasks=check_tasks(cfg.get("tasks")))
    t = out.trainer
    for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            raise PtmError(f"trainer.{key}={getattr(t, key)} must be at least 1.")
    for name, entry in out.entries().items():
        where = f"tasks.{name}." if out.tasks else ""
        if not entry.data.train or entry.data.train == "???":
            raise PtmError(f"{where}data.train is not set (task data '{entry.data.name}'): add {where}data.train=PATH.")
        if not entry.trainer.metric.startswith("val/"):
            raise PtmError(
                f"{where}trainer.metric={entry.trainer.metric!r} must name a validation metric, e.g. val/accuracy."
            )
    if not t.metric.startswith("val/"):
        raise PtmError(f"trainer.metric={t.metric!r} must name a validation metric, e.g. val/accuracy or val/loss.")
    if out.mixture.temperature <= 0:
        raise PtmError(f"mixture.temperature={out.mixture.temperature} must be above 0 (1 = proportional).")
    for name, entry in out.entries().items():
        if entry.task.objective == "simcse-supervised":
            check_supervised_simcse(out, entry)
    if out.tasks and t.metric == "val/mean" and len({e.trainer.metric_mode for e in out.tasks.values()}) > 1:
        raise PtmError(
            "trainer.metric=val/mean averages the tasks' own metrics, but some are better larger and some smaller "
            f"({', '.join(f'{n}: {e.trainer.metric} {e.trainer.metric_mode}' for n, e in out.tasks.items())}); "
            "pick one task's metric instead, e.g. trainer.metric=val/NAME/accuracy trainer.metric_mode=max."
        )
    x = out.transfer
    if x.mode == "adalora" and not 0 < x.target_r <= x.init_r:
        raise PtmError(f"transfer.target_r={x.target_r} must lie in 1..transfer.init_r={x.init_r}.")
    if x.mode in ("lora", "adalora") and not x.targets:
        raise PtmError("transfer.targets is empty: name the linear layers to adapt, e.g. [query,value].")
    return out


def check_supervised_simcse(cfg: FinetuneConfig, entry: TaskEntry) -> None:
    """Supervised SimCSE trains one encoder's sentence vectors from text pairs."""
    problem = None
    if cfg.tasks:
        problem = "it trains one task at a time; drop it from the multi-task run"
    elif entry.task.kind != "pair-cls":
        problem = f"it learns from text pairs, and task.kind={entry.task.kind} has none: use a pair-cls task"
    elif cfg.transfer.mode in ("frozen", "text-to-text"):
        problem = f"transfer={cfg.transfer.mode} leaves no encoder to train; use full, partial or a PEFT method"
    elif entry.task.pooling == "last":
        problem = "task.pooling=last is not a sentence pooling; use cls or mean (pooler = cls)"
    elif entry.task.temperature <= 0:
        problem = f"task.temperature={entry.task.temperature} must be above 0"
    if problem:
        raise PtmError(f"objective=simcse-supervised: {problem}.")


ENTRY_SECTIONS = {
    "task": TaskConfig,
    "data": LabeledDataConfig,
    "trainer": FinetuneTrainerConfig,
    "optimizer": OptimizerConfig,
}


def check_tasks(values: Any) -> dict[str, TaskEntry] | None:
    """The `tasks` mapping of a multi-task run (task=[a,b] writes it): each entry a task file's sections."""
    if values is None:
        return None
    if not isinstance(values, dict) or not values:
        raise PtmError(f"'tasks' must map task names to their sections (task=[a,b] writes it), got {values!r}.")
    sections = ENTRY_SECTIONS
    entries = {}
    for name, entry in values.items():
        if not isinstance(entry, dict):
            raise PtmError(f"'tasks.{name}' must be a mapping of sections ({', '.join(sections)}), got {entry!r}.")
        unknown = [k for k in entry if k not in sections]
        if unknown:
            raise PtmError(
                f"Unknown key 'tasks.{name}.{unknown[0]}'.{did_you_mean(str(unknown[0]), sections)} A task of a "
                f"multi-task run sets: {', '.join(sections)}."
            )
        entries[str(name)] = TaskEntry(
            **{
                key: check_section(f"tasks.{name}.{key}", entry.get(key) or {}, schema)
                for key, schema in sections.items()
            }
        )
    return entries
