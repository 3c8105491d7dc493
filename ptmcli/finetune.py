"""`ptm finetune`: pretrained encoder + task head, trained by the same loop as pretraining."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import datasets
import torch

from ptmcli import checkpoint, hardware, peft, rundir, runfiles
from ptmcli.architectures import a_family
from ptmcli.data.labeled import label_names, load_splits
from ptmcli.data.tokenizer import load_tokenizer, train_tokenizer
from ptmcli.distributed import init_from_env
from ptmcli.errors import PtmError
from ptmcli.files import write_whole
from ptmcli.finetune_checks import check_finetune
from ptmcli.loop import Job, check_metric, evaluate, train
from ptmcli.models import ENCODERS, SEQ2SEQ_MODELS
from ptmcli.models.heads import HEADS, MultiTaskModel, SentenceEncoder, TaskModel
from ptmcli.runlog import console, print_metrics
from ptmcli.schema import (
    SEQ2SEQ_FAMILIES,
    DataConfig,
    FinetuneConfig,
    TaskConfig,
    TaskEntry,
    architecture_spec,
)
from ptmcli.tasks import TASKS
from ptmcli.tasks.multitask import MultiTask, mixture_weights
from ptmcli.tasks.sentence_pairs import SentencePairs
from ptmcli.tasks.text2text import TextToText
from ptmcli.weights import Pretrained, load_pretrained


def scratch(cfg: FinetuneConfig, train_texts: list[str]) -> Pretrained:
    """A randomly initialised encoder of `model=...`; its tokenizer is given, or trained on the task's texts."""
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(datasets.Dataset.from_dict({"text": train_texts}), DataConfig(vocab_size=8000))
    return Pretrained(cfg.model.family, cfg.model, {}, tokenizer, f"random init ({cfg.model.family})")


def build_encoder(pretrained: Pretrained, transfer) -> torch.nn.Module:
    """Encoder of the pretrained family with its weights; transfer=partial freezes its embeddings and lower layers."""
    vocab = pretrained.tokenizer.get_vocab_size()
    encoder = ENCODERS[pretrained.family](pretrained.arch, vocab)
    if pretrained.encoder_state:
        missing, unexpected = encoder.load_state_dict(pretrained.encoder_state, strict=False)
        missing = [k for k in missing if not k.startswith("pooler")]  # an MLM-only checkpoint has no pooler
        if missing or unexpected:
            raise PtmError(
                f"The weights of {pretrained.source} do not fit {a_family(pretrained.family)} encoder (missing "
                f"{missing[:5]}, unexpected {list(unexpected)[:5]})."
            )
    if transfer.mode == "partial":
        if not 0 <= transfer.freeze_layers <= len(encoder.layers):
            raise PtmError(f"transfer.freeze_layers={transfer.freeze_layers} must lie in 0..{len(encoder.layers)}.")
        encoder.embeddings.requires_grad_(False)
        for layer in encoder.layers[: transfer.freeze_layers]:
            layer.requires_grad_(False)
    return encoder


def build_model(
    pretrained: Pretrained, kind: str, num_labels: int, dropout: float, transfer, pooling: str = "pooler"
) -> TaskModel:
    """The pretrained encoder, a fresh head, and the transfer mode's frozen parts."""
    encoder = build_encoder(pretrained, transfer)
    return TaskModel(encoder, HEADS[kind], num_labels, dropout, frozen=transfer.mode == "frozen", pooling=pooling)


def sentence_model(pretrained: Pretrained, task: TaskConfig, transfer) -> SentenceEncoder:
    """Supervised SimCSE: the pretrained encoder's pooled states through a projection used in training only (ptm
    embed and retrieval read the encoder)."""
    pooling = "cls" if task.pooling == "pooler" else task.pooling
    return SentenceEncoder(build_encoder(pretrained, transfer), pooling, projection=True)


def build_multitask_model(
    pretrained: Pretrained, entries: dict[str, TaskEntry], labels: dict[str, list[str]], transfer, dropout: bool = True
) -> MultiTaskModel:
    """The pretrained encoder shared by a fresh head per task. `dropout=False`: none before the heads (inference)."""
    heads = {
        name: (HEADS[e.task.kind], len(labels[name]), e.task.pooling, e.task.classifier_dropout if dropout else 0.0)
        for name, e in entries.items()
    }
    return MultiTaskModel(build_encoder(pretrained, transfer), heads, frozen=transfer.mode == "frozen")


def keep_head(model: TaskModel, pretrained: Pretrained, kind: str, labels: list[str]) -> bool:
    """Two-stage fine-tuning: init= a fine-tuning run of the same task kind and labels also gives its head (with
    other labels the head is dropped, and this run trains its own)."""
    if pretrained.checkpoint is None or "head.weight" not in pretrained.model_state:
        return False
    run = pretrained.checkpoint.parent.parent
    spec = checkpoint.read_state(pretrained.checkpoint).get("model", {})
    if spec.get("task") != kind or not (run / "labels.json").exists() or runfiles.labels(run, "init") != labels:
        return False
    model.head.load_state_dict(
        {k.removeprefix("head."): v for k, v in pretrained.model_state.items() if k.startswith("head.")}
    )
    return True


def check_lengths(task: TaskConfig, pretrained: Pretrained, where: str = "") -> None:
    """Inputs must fit the learned position embeddings (XLNet and T5 use relative positions: no limit). `where`: the
    key prefix of a multi-task run's task (tasks.NAME.)."""
    if pretrained.family in ("xlnet", "t5"):
        return
    limit = pretrained.arch.max_positions
    for key, value in (("task.max_seq_len", task.max_seq_len), ("task.max_target_len", task.max_target_len)):
        if value > limit and (key == "task.max_seq_len" or task.kind == "text2text"):
            raise PtmError(
                f"{where}{key}={value} is longer than the {pretrained.family} model's {limit} positions "
                f"({pretrained.source}); lower {where}{key}."
            )


def writes_text(kinds: list[str], transfer: str, family: str) -> bool:
    """Whether this run trains an encoder-decoder to write its answers (text2text tasks, transfer=text-to-text)."""
    wanted = "text2text" in kinds or transfer == "text-to-text"
    transfer_fits = transfer in ("full", "text-to-text")
    if wanted and family not in SEQ2SEQ_FAMILIES:
        # Both fixes in one message when both are needed, so the second is not found only on the next try.
        also = "" if transfer_fits else f", and transfer={transfer} does not write text: use transfer=text-to-text"
        if transfer == "full" and len(set(kinds)) > 1:
            also = (
                ", and its tasks mix writing text and classifying: use transfer=text-to-text, which writes every answer"
            )
        what = (
            f"task.kind={kinds[0]} with transfer={transfer} writes text and needs"
            if len(kinds) == 1
            else f"Tasks of kinds {', '.join(dict.fromkeys(kinds))} with transfer={transfer} write text and need"
        )
        raise PtmError(
            f"{what} an encoder-decoder "
            f"({', '.join(SEQ2SEQ_FAMILIES)}); this run's model is {family}{also}. Start from a t5 or bart run "
            "(model=t5-mini or init=PATH of one)."
        )
    if wanted and not transfer_fits:
        raise PtmError(f"transfer={transfer} is not available for text-to-text training; use transfer=text-to-text.")
    if wanted and transfer == "full" and len(set(kinds)) > 1:
        raise PtmError(
            f"The tasks {kinds} mix text-writing (text2text) and classification heads; one encoder-decoder writes "
            f"every task's answer with transfer=text-to-text."
        )
    if wanted and any(kind not in ("text-cls", "pair-cls", "text2text") for kind in kinds):
        raise PtmError(f"transfer=text-to-text casts classification tasks as text; task.kind={kinds} is not.")
    return wanted


def text_task(task: TaskConfig, labels: list[str], pretrained: Pretrained) -> TextToText:
    start = "pad" if pretrained.family == "t5" else "sep"
    return TextToText(task, labels, pretrained.tokenizer, decoder_start=start)


def build_seq2seq(pretrained: Pretrained) -> torch.nn.Module:
    model = SEQ2SEQ_MODELS[pretrained.family](pretrained.arch, pretrained.tokenizer.get_vocab_size())
    if pretrained.model_state:
        missing, unexpected = model.load_state_dict(pretrained.model_state, strict=False)
        if missing or unexpected:
            raise PtmError(
                f"The weights of {pretrained.source} do not fit {a_family(pretrained.family)} encoder-decoder (missing "
                f"{missing[:5]}, unexpected {list(unexpected)[:5]})."
            )
    return model


def layer_lr_scale(num_layers: int, decay: float):
    """Layer-wise lr decay: the head and pooler at full lr, layer i at decay^(L-i), embeddings at decay^(L+1)
    (with ELECTRA's projection of the embeddings to the encoder's width: it sits below layer 0)."""

    def scale(name: str) -> float:
        if name.startswith(("encoder.embeddings", "encoder.projection")):
            return decay ** (num_layers + 1)
        match = re.match(r"encoder\.layers\.(\d+)\.", name)
        return decay ** (num_layers - int(match.group(1))) if match else 1.0

    return scale


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Checksum of base weights, recorded by parameter-efficient runs whose checkpoints hold only the method."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_spec(pretrained: Pretrained, kind: str, num_labels: int) -> dict:
    return {
        **architecture_spec(pretrained.arch),
        "vocab_size": pretrained.tokenizer.get_vocab_size(),
        "task": kind,
        "num_labels": num_labels,
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 3)}


def check_labels(entry: TaskEntry, labels: list[str], where: str = "") -> None:
    """The label list fits the task: a weight per label, and at least two classes to tell apart."""
    weights = entry.task.class_weights
    if weights is not None and len(weights) != len(labels):
        raise PtmError(
            f"{where}task.class_weights has {len(weights)} values but there are {len(labels)} labels "
            f"{labels}; give one weight per label, in that order."
        )
    if entry.task.kind not in ("qa", "text2text") and len(labels) < 2:
        raise PtmError(
            f"data '{entry.data.name}' has {len(labels)} label(s) {labels}; classification needs at least 2."
        )


def build_tasks(cfg: FinetuneConfig, labels: dict, pretrained: Pretrained, text: bool) -> dict:
    """Each task's loss/metrics/prediction object; in a multi-task text-to-text run a task without a prefix gets
    'NAME: ' so that the one model knows which answer to write."""
    tasks = {}
    for name, entry in cfg.entries().items():
        task = entry.task
        if text and cfg.tasks and not task.prefix:
            task = dataclasses.replace(task, prefix=f"{name}: ")
        if text:
            tasks[name] = text_task(task, labels[name], pretrained)
        elif task.objective == "simcse-supervised":
            tasks[name] = SentencePairs(task, labels[name], pretrained.tokenizer)
        else:
            tasks[name] = TASKS[task.kind](task, labels[name], pretrained.tokenizer)
    return tasks


def multitask_objective(cfg: FinetuneConfig, tasks: dict, text: bool) -> MultiTask:
    scores = {name: e.trainer.metric.removeprefix("val/") for name, e in cfg.entries().items()}
    return MultiTask(tasks, scores, routed=not text)


def task_and_examples(cfg: FinetuneConfig, splits: dict, labels: dict, pretrained: Pretrained, text: bool):
    """(the objective the loop trains, its examples by split, each task's share of batches or None): a task, or
    several as one MultiTask whose training batches are drawn by `mixture`."""
    tasks = build_tasks(cfg, labels, pretrained, text)
    if cfg.tasks is None:
        task, records = tasks[cfg.data.name], splits[cfg.data.name]
        return task, {split: task.examples(rows) for split, rows in records.items()}, None
    task = multitask_objective(cfg, tasks, text)
    weights = mixture_weights({name: len(parts["train"]) for name, parts in splits.items()}, cfg.mixture)
    examples = {
        split: task.examples({n: parts[split] for n, parts in splits.items()}, weights if split == "train" else None)
        for split in ("train", "validation", "test")
    }
    return task, examples, weights


def task_model(cfg: FinetuneConfig, pretrained: Pretrained, labels: dict, text: bool) -> torch.nn.Module:
    """An encoder-decoder writing answers, an encoder with a head per task, a sentence encoder, or encoder + head."""
    if text:
        return build_seq2seq(pretrained)
    if cfg.tasks is not None:
        return build_multitask_model(pretrained, cfg.tasks, labels, cfg.transfer)
    if cfg.task.objective == "simcse-supervised":
        return sentence_model(pretrained, cfg.task, cfg.transfer)
    n = len(labels[cfg.data.name])
    return build_model(pretrained, cfg.task.kind, n, cfg.task.classifier_dropout, cfg.transfer, cfg.task.pooling)


def run_spec(cfg: FinetuneConfig, pretrained: Pretrained, labels: dict, text: bool) -> dict:
    """The model's identity stored in checkpoints: a resume must build the same one."""
    if cfg.tasks is not None:
        spec = model_spec(pretrained, "multi-task", sum(len(v) for v in labels.values()))
        spec["tasks"] = {n: [e.task.kind, len(labels[n])] for n, e in cfg.tasks.items()}
    else:
        spec = model_spec(pretrained, cfg.task.kind, len(labels[cfg.data.name]))
    spec["text_to_text"] = text
    if cfg.task.objective != "head":  # a sentence encoder, not a head: a checkpoint of one does not resume the other
        spec["objective"] = cfg.task.objective
    return spec


def start_line(cfg, splits, labels, pretrained, kept_head, counts, steps, weights, hw, run_dir) -> str:
    """What the run trains, from what, and where it writes."""
    loaded = f" ({pretrained.load_seconds:.1f} s)" if pretrained.load_seconds else ""
    unused = [k for k in pretrained.unused if not (kept_head and k == "head")]
    if unused:  # e.g. a fine-tuned checkpoint's classifier for other labels: this run trains its own head
        loaded += f"; not taken from it: {', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}"
    if kept_head:
        loaded += "; its head too (same task kind and labels)"
    lines = []
    for name, entry in cfg.entries().items():
        sizes = " / ".join(f"{len(splits[name][k]):,}" for k in ("train", "validation", "test"))
        share = f", {weights[name]:.0%} of batches" if weights else ""
        what = f"{entry.data.name} ({entry.task.kind}, {len(labels[name])} labels)"
        lines.append(f"{'  ' + what + ': ' if cfg.tasks else '  '}{sizes} train/val/test examples{share}")
    title = (
        f"{len(lines)} tasks"
        if cfg.tasks
        else f"{cfg.data.name} ({cfg.task.kind}, {len(labels[cfg.data.name])} labels)"
    )
    return (
        f"[bold]ptm finetune[/] {title} from {pretrained.source}{loaded}\n" + "\n".join(lines) + "\n"
        f"  transfer={cfg.transfer.mode}, {counts['trainable']:,} of {counts['total']:,} parameters trainable "
        f"({counts['trainable_percent']}%), {steps} steps, {hw.device}\n  run dir: {run_dir}"
    )


def finetune(
    raw_cfg: dict, run_dir: Path, recipe: str, named_dir: bool = False, hydra_files: dict | None = None
) -> dict[str, float]:
    """`named_dir`: the user named the run directory; `hydra_files`: Hydra's record of the invocation (see rundir).
    One task, or several (task=[a,b]) sharing one encoder with a head each; the single task is the one-entry case
    of the same steps, its files and metrics written without task prefixes."""
    cfg = check_finetune(raw_cfg)
    datasets.disable_progress_bars()
    dist = init_from_env()
    hw = hardware.resolve(cfg.hardware, dist)
    run_dir, resume_from = rundir.prepare(run_dir, raw_cfg, "finetune", recipe, dist, named_dir)
    entries, multi = cfg.entries(), cfg.tasks is not None
    where = {name: f"tasks.{name}." if multi else "" for name in entries}
    splits = {name: load_splits(e.data, e.task.kind) for name, e in entries.items()}
    labels = {name: label_names(splits[name], e.task.kind, e.task.labels, e.data.name) for name, e in entries.items()}
    for name, entry in entries.items():
        check_labels(entry, labels[name], where[name])
    if cfg.init:
        pretrained = load_pretrained(cfg.init)
    else:
        pretrained = scratch(cfg, [r.get("text", "") for parts in splits.values() for r in parts["train"]])
    text = writes_text([e.task.kind for e in entries.values()], cfg.transfer.mode, pretrained.family)
    for name, entry in entries.items():
        check_lengths(entry.task, pretrained, where[name])
    task, examples, weights = task_and_examples(cfg, splits, labels, pretrained, text)
    check_metric(task, cfg.trainer.metric)
    torch.manual_seed(cfg.trainer.seed)
    model = task_model(cfg, pretrained, labels, text)
    kept_head = not (text or multi) and keep_head(model, pretrained, cfg.task.kind, labels[cfg.data.name])
    trainer = cfg.trainer
    if trainer.epochs is not None:  # several tasks: passes over their training examples together
        per_step = trainer.batch_size * dist.world_size * trainer.grad_accum
        trainer = dataclasses.replace(
            trainer, max_steps=max(1, math.ceil(trainer.epochs * len(examples["train"]) / per_step))
        )
    spec = run_spec(cfg, pretrained, labels, text)
    method, saved_keys = None, None
    if cfg.transfer.mode in peft.METHODS:
        method = peft.apply(model, cfg.transfer, trainer.max_steps)
        # checkpoints hold the method and the base's checksum; a base built at random (init=none) exists nowhere
        # else, so they hold it too
        saved_keys = peft.trainable_keys(model) if cfg.init else None
        base_sha256 = state_digest(pretrained.encoder_state) if cfg.init else None
        spec.update(transfer=cfg.transfer.mode, base_sha256=base_sha256)
    if resume_from is not None:
        checkpoint.check_architecture(resume_from, checkpoint.read_state(resume_from).get("model", {}), spec)
    counts = parameter_counts(model)
    rundir.record(
        run_dir,
        raw_cfg,
        "finetune",
        recipe,
        dist,
        {"parameters": counts, "init": pretrained.source},
        fresh=resume_from is None,
        hydra_files=hydra_files,
    )
    if dist.is_main:
        pretrained.tokenizer.save(str(run_dir / "tokenizer.json"))
        split_ids = {n: {k: [r["id"] for r in v] for k, v in parts.items()} for n, parts in splits.items()}
        write_whole(
            run_dir / "labels.json", json.dumps(labels if multi else labels[cfg.data.name], indent=1) + "\n", "run"
        )
        write_whole(run_dir / "splits.json", json.dumps(split_ids if multi else split_ids[cfg.data.name]) + "\n", "run")
        console.print(
            start_line(cfg, splits, labels, pretrained, kept_head, counts, trainer.max_steps, weights, hw, run_dir)
        )
    decay = getattr(cfg.transfer, "layer_lr_decay", 1.0)
    lr_scale = layer_lr_scale(pretrained.arch.num_layers, decay) if decay != 1.0 else None
    job = Job(
        model=model,
        objective=task,
        train=examples["train"],
        val=examples["validation"],
        model_spec=spec,
        lr_scale=lr_scale,
        method=method,
        saved_keys=saved_keys,
    )
    train(job, trainer, cfg.optimizer, hw, dist, run_dir, resume_from, scale=cfg.hardware)

    best = run_dir / "checkpoints" / "best"
    checkpoint.load_weights(
        (best if best.exists() else run_dir / "checkpoints" / "latest").resolve(), model, saved_keys
    )
    metrics = evaluate(task, model, examples["test"], trainer.batch_size, 0, hw, dist)
    if dist.is_main:
        write_whole(run_dir / "test_metrics.json", json.dumps(metrics, indent=1) + "\n", "run")
        show_metrics(f"test ({best.resolve().name if best.exists() else 'latest'})", metrics, labels, multi)
    return metrics


def show_metrics(title: str, metrics: dict, labels: dict[str, list[str]], multi: bool) -> None:
    """A table per task (with its confusion matrix), and the tasks' mean for a multi-task run."""
    if not multi:
        print_metrics(title, metrics, next(iter(labels.values())))
        return
    for name, names in labels.items():
        print_metrics(f"{name} {title}", MultiTask.task_metrics(metrics, name), names)
    console.print(f"mean of the tasks' metrics: {metrics.get('mean', float('nan')):.4f}")
