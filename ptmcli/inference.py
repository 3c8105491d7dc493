"""`ptm evaluate` and `ptm predict`: a finished fine-tuning run, reloaded from its own config, tokenizer and labels."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import datasets
import torch

from ptmcli import checkpoint, hardware, peft, runfiles
from ptmcli.data.labeled import label_names, load_splits
from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
from ptmcli.files import json_type, read_text, replaced_whole, write_whole
from ptmcli.finetune import (
    build_model,
    build_multitask_model,
    build_seq2seq,
    build_tasks,
    multitask_objective,
    sentence_model,
    show_metrics,
    state_digest,
)
from ptmcli.finetune_checks import check_finetune
from ptmcli.loop import evaluate, to_device
from ptmcli.runlog import console
from ptmcli.schema import arch_from_spec
from ptmcli.transfers import FullTransfer
from ptmcli.typecheck import did_you_mean
from ptmcli.weights import Pretrained, load_pretrained


def checkpoint_of(run: Path, name: str | None) -> Path:
    """The named checkpoint of a run, else its best, else its latest."""
    root = run / "checkpoints"
    if name:
        path = root / name if (root / name).exists() else Path(name)
    else:
        path = root / "best" if (root / "best").exists() else checkpoint.latest(root)
    if path is None or not (path / checkpoint.MARKER).exists():
        raise PtmError(f"run='{run}' has no complete checkpoint{' ' + name if name else ''} under checkpoints/.")
    return path.resolve()


def load_run(run: Path, checkpoint_name: str | None = None, with_method: bool = False, task_name: str | None = None):
    """(config, task, model, labels, hardware, checkpoint[, method]) of a fine-tuning run, with the weights of its
    best checkpoint. `method` is the parameter-efficient method (None for full/frozen/partial runs). A multi-task
    run gives its MultiTask objective (over `task_name` only, when given) and its labels by task."""
    raw = runfiles.config(run)
    if runfiles.is_pretraining(raw):
        raise PtmError(
            f"run='{run}' is a pretraining run; this command reads a fine-tuning run (ptm finetune init={run} makes "
            f"one), or use ptm export / ptm generate on it."
        )
    cfg = check_finetune(raw)
    multi = cfg.tasks is not None
    labels = runfiles.labels(run, multi=multi)
    by_task = labels if multi else {cfg.data.name: labels}
    if task_name is not None and task_name not in cfg.entries():
        raise PtmError(
            f"task={task_name}: run '{run}' trained {', '.join(cfg.entries())}"
            + (f"; name one of them.{did_you_mean(task_name, cfg.entries())}" if multi else "; drop task=.")
        )
    tokenizer = runfiles.tokenizer(run)
    ckpt = checkpoint_of(run, checkpoint_name)
    spec = checkpoint.read_state(ckpt)["model"]

    def fresh_model(pretrained: Pretrained, transfer):
        if multi:
            return build_multitask_model(pretrained, cfg.entries(), by_task, transfer, dropout=False)
        if cfg.task.objective == "simcse-supervised":
            return sentence_model(pretrained, cfg.task, transfer)
        return build_model(pretrained, cfg.task.kind, len(labels), 0.0, transfer, pooling=cfg.task.pooling)

    method = None
    if spec.get("transfer") in peft.METHODS:
        if spec["base_sha256"] is None:  # init=none: the checkpoint holds the random base with the method
            pretrained = Pretrained(spec["family"], arch_from_spec(spec), {}, tokenizer, str(ckpt))
        elif not cfg.init:  # written before checkpoints kept a random base
            raise PtmError(
                f"run '{run}' trained transfer={cfg.transfer.mode} on a model built at random (init=none), and its "
                "checkpoints hold the method without that base (earlier versions of ptm kept none): the run cannot be "
                "used. Train it again; its checkpoints now keep the base."
            )
        else:  # the checkpoint holds the method only: start from the base weights
            pretrained = load_pretrained(cfg.init)
            if state_digest(pretrained.encoder_state) != spec["base_sha256"]:
                raise PtmError(
                    f"The base weights at init='{cfg.init}' are not the ones run '{run}' was trained on "
                    f"(checksum differs); restore them to use this run."
                )
        model = fresh_model(pretrained, cfg.transfer)
        method = peft.apply(model, cfg.transfer, cfg.trainer.max_steps)
        checkpoint.load_weights(ckpt, model, None if spec["base_sha256"] is None else peft.trainable_keys(model))
        if method.prefix is not None and not with_method:
            method.prefix.freeze()  # plain prefix tensors from here on
    else:
        pretrained = Pretrained(spec["family"], arch_from_spec(spec), {}, tokenizer, str(ckpt))
        model = build_seq2seq(pretrained) if spec.get("text_to_text") else fresh_model(pretrained, FullTransfer())
        checkpoint.load_weights(ckpt, model)
    hw = hardware.resolve(cfg.hardware, Dist())
    model.to(hw.device).eval()
    text = bool(spec.get("text_to_text"))
    tasks = build_tasks(cfg, by_task, Pretrained(spec["family"], None, {}, tokenizer, str(ckpt)), text)
    if multi:
        task = multitask_objective(cfg, {n: t for n, t in tasks.items() if task_name in (None, n)}, text)
    else:
        task = tasks[cfg.data.name]
    return (cfg, task, model, labels, hw, ckpt, method) if with_method else (cfg, task, model, labels, hw, ckpt)


def checked_split(run: Path, data, kind: str, split: str, labels: list[str], saved: list | None) -> list[dict]:
    """The records of `split`, which must be the ones the run was trained with (`saved` ids from splits.json)."""
    records = load_splits(data, kind)[split]
    if saved is not None and saved != [r["id"] for r in records]:
        raise PtmError(
            f"The {split} split of data '{data.name}' is not the one this run was trained with "
            f"(see {run / 'splits.json'}): the data or its split settings changed."
        )
    label_names({split: records}, kind, labels, data.name)  # fails on labels unseen in training
    return records


def evaluate_run(
    run: Path,
    split: str,
    checkpoint_name: str | None = None,
    task_name: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Metrics of a run on one of its splits; a multi-task run's on every task (or on `task_name`), `batch_size`
    texts at a time (default: the run's trainer.batch_size; the metrics depend on it only by rounding)."""
    datasets.disable_progress_bars()
    if split not in ("train", "validation", "test"):
        raise PtmError(f"split={split!r}: choose train, validation or test.")
    cfg, task, model, labels, hw, ckpt = load_run(run, checkpoint_name, task_name=task_name)
    saved_path = run / "splits.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    single = cfg.tasks is None  # then labels, splits.json and the records are those of the one task
    by_task = {cfg.data.name: labels} if single else labels
    ids = {cfg.data.name: saved} if single else saved
    records = {
        name: checked_split(run, entry.data, entry.task.kind, split, by_task[name], ids.get(name, {}).get(split))
        for name, entry in cfg.entries().items()
        if single or name in task.tasks
    }
    examples = task.examples(records[cfg.data.name]) if single else task.examples(records, None)
    metrics = evaluate(task, model, examples, batch_size or cfg.trainer.batch_size, 0, hw, Dist())
    suffix = f"_{task_name}" if task_name else ""
    write_whole(run / f"eval_{split}{suffix}.json", json.dumps(metrics, indent=1) + "\n", "run")
    show_metrics(f"{split} ({ckpt.name})", metrics, {n: by_task[n] for n in records}, not single)
    print(json.dumps(metrics))
    return metrics


def read_records(path: Path, kind: str) -> list[dict]:
    """One input per line: plain text (words for token-cls), or JSON objects with the task's fields."""
    records = []
    for n, line in enumerate(read_text(path, "input").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PtmError(f"{path}:{n}: not valid JSON: {err}") from err
        elif kind == "qa":
            raise PtmError(f"{path}:{n}: QA input must be JSON lines with 'question' and 'context'.")
        else:
            record = {"text": line}
        if kind == "token-cls" and "tokens" not in record:
            record["tokens"] = record.get("text", "").split() if isinstance(record.get("text", ""), str) else None
        record.setdefault("id", str(n))
        needed = {
            "text-cls": ["text"],
            "pair-cls": ["text", "text_pair"],
            "token-cls": ["tokens"],
            "qa": ["question", "context"],
            "text2text": ["text"],
        }[kind]
        missing = [k for k in needed if k not in record]
        if missing:
            raise PtmError(f"{path}:{n}: missing field(s) {missing} for a {kind} model.")
        for field in needed:
            value = record[field]
            if field == "tokens" and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
                raise PtmError(
                    f'{path}:{n}: "tokens" must be a list of strings (["EU", "rejects", ...]), or "text" a string.'
                )
            if field != "tokens" and not isinstance(value, str):
                raise PtmError(
                    f'{path}:{n}: "{field}" is a JSON {json_type(value)}, not a string; put the text in quotes.'
                )
        if kind == "token-cls":
            record["tags"] = ["O"] * len(record["tokens"])
        records.append(record)
    if not records:
        raise PtmError(f"input='{path}' holds no inputs.")
    return records


@torch.no_grad()
def predict_run(
    run: Path,
    input_path: Path,
    output: str | None = None,
    checkpoint_name: str | None = None,
    task_name: str | None = None,
) -> None:
    cfg, task, model, labels, hw, _ = load_run(run, checkpoint_name, task_name=task_name)
    kind = cfg.task.kind
    if cfg.tasks is not None:
        if task_name is None:
            raise PtmError(
                f"run '{run}' is a multi-task run ({', '.join(cfg.tasks)}): say which task predicts, e.g. "
                f"task={next(iter(cfg.tasks))}."
            )
        kind, model, task = cfg.tasks[task_name].task.kind, task.view(model, task_name), task.tasks[task_name]
    records = read_records(input_path, kind)
    examples = task.examples(records)
    with replaced_whole(Path(output), "output") if output else contextlib.nullcontext(sys.stdout) as out:
        for start, stop in examples.eval_ranges(cfg.trainer.batch_size):
            batch = examples.batch(list(range(start, stop)), 0)
            batch = to_device(batch, hw.device)
            with hw.autocast():
                predictions = task.predict(model, batch)
            for prediction in predictions:
                out.write(json.dumps(prediction, ensure_ascii=False) + "\n")
    if output:
        console.print(f"{len(records)} predictions written to {output}")
