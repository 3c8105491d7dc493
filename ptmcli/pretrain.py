"""`ptm pretrain`: check the config, build data, model and objective, hand them to the loop."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer

from ptmcli import checkpoint, hardware, rundir
from ptmcli.data.lm_examples import CausalExamples, PermutationExamples
from ptmcli.data.pretraining import PretrainingExamples, build_chunks
from ptmcli.data.seq2seq_examples import DenoisingExamples, SpanCorruptionExamples
from ptmcli.data.sources import load_documents, split_documents
from ptmcli.data.tokenizer import get_tokenizer
from ptmcli.distributed import Dist, init_from_env
from ptmcli.errors import PtmError
from ptmcli.loop import Job, train
from ptmcli.models import PRETRAINING_MODELS
from ptmcli.objectives import OBJECTIVES
from ptmcli.runlog import console
from ptmcli.schema import PretrainConfig, architecture_spec, check_pretrain
from ptmcli.weights import Pretrained, load_pretrained


# objective -> packing layout of its sequences (see data.pretraining.LAYOUTS)
LAYOUT = {
    "mlm-nsp": "sentences",
    "mlm": "blocks-cls-sep",
    "rtd": "blocks-cls-sep",
    "plm": "blocks-cls-sep",
    "clm": "blocks",
    "span-corruption": "blocks",
    "denoise": "sentences",
}


def make_examples(cfg: PretrainConfig, chunks, tokenizer):
    o, seed = cfg.objective, cfg.trainer.seed
    if o.name == "clm":
        return CausalExamples(chunks, tokenizer)
    if o.name == "plm":
        return PermutationExamples(chunks, tokenizer, o, seed)
    if o.name == "span-corruption":
        return SpanCorruptionExamples(chunks, tokenizer, o, seed)
    if o.name == "denoise":
        return DenoisingExamples(chunks, tokenizer, o, seed)
    return PretrainingExamples(chunks, tokenizer, o, seed, nsp=o.name == "mlm-nsp")


def build_examples(cfg: PretrainConfig, dist: Dist, tokenizer=None) -> tuple:
    """(tokenizer, train examples, validation examples). Rank 0 prepares first; the others then hit its caches.
    `tokenizer` is init's; without one, data.tokenizer is loaded or a tokenizer is trained."""
    if not dist.is_main:
        dist.barrier()
    docs = load_documents(cfg.data)
    train_docs, val_docs = split_documents(docs, cfg.data)
    tokenizer = get_tokenizer(
        train_docs, cfg.data, need_mask=cfg.objective.name in ("mlm", "mlm-nsp", "rtd", "denoise"), given=tokenizer
    )
    chunks = {
        name: build_chunks(
            d, tokenizer, cfg.data.max_seq_len, LAYOUT[cfg.objective.name], cfg.data.num_proc, cfg.data.word_segmenter
        )
        for name, d in (("train", train_docs), ("val", val_docs))
    }
    if dist.is_main:
        dist.barrier()
    return (
        tokenizer,
        *(make_examples(cfg, chunks[s], tokenizer) for s in ("train", "val")),
        (len(train_docs), len(val_docs)),
    )


def model_spec(cfg: PretrainConfig, vocab_size: int) -> dict:
    return {**architecture_spec(cfg.model), "vocab_size": vocab_size, "objective": cfg.objective.name}


def load_init(cfg: PretrainConfig) -> Pretrained:
    """The pretraining run named by init=, after checking it has this config's architecture and objective."""
    start = load_pretrained(cfg.init)
    saved_objective = (
        checkpoint.read_state(start.checkpoint).get("model", {}).get("objective") if start.checkpoint else None
    )
    if saved_objective is None or start.family != cfg.model.family:
        raise PtmError(
            f"init={cfg.init} is {start.source}, not a ptm pretraining run of a {cfg.model.family} model. "
            f"init= continues pretraining from a run of `ptm pretrain`; to fine-tune, use `ptm finetune init=...`."
        )
    if saved_objective != cfg.objective.name:  # its heads (NSP, discriminator, ...) belong to that objective
        raise PtmError(
            f"init={cfg.init} was pretrained with objective={saved_objective} and this config has "
            f"objective={cfg.objective.name}; continue with objective={saved_objective} (or the recipe it used)."
        )
    diffs = checkpoint.spec_diffs(architecture_spec(start.arch), architecture_spec(cfg.model))
    if diffs:
        raise PtmError(
            f"init={cfg.init} was trained with another architecture ({'; '.join(diffs)}). Pick the recipe or "
            f"model=NAME it was pretrained with (its config.yaml says which)."
        )
    return start


def pretrain(raw_cfg: dict, run_dir: Path, recipe: str) -> dict[str, float]:
    cfg = check_pretrain(raw_cfg)
    datasets.disable_progress_bars()  # one summary line says what preparation produced
    dist = init_from_env()
    hw = hardware.resolve(cfg.hardware, dist)
    run_dir, resume_from = rundir.prepare(run_dir, raw_cfg, "pretrain", recipe, dist)
    start = load_init(cfg) if cfg.init and resume_from is None else None
    given = start.tokenizer if start else None
    if cfg.init and resume_from is not None:  # the tokenizer init lent this run was saved beside it
        given = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    tokenizer, train_ex, val_ex, (n_train_docs, n_val_docs) = build_examples(cfg, dist, given)
    vocab_size = tokenizer.get_vocab_size()
    spec = model_spec(cfg, vocab_size)
    if resume_from is not None:
        checkpoint.check_architecture(resume_from, checkpoint.read_state(resume_from).get("model", {}), spec)
    rundir.record(run_dir, raw_cfg, "pretrain", recipe, dist)
    if dist.is_main:
        tokenizer.save(str(run_dir / "tokenizer.json"))

    torch.manual_seed(cfg.trainer.seed)
    model = PRETRAINING_MODELS[cfg.model.family](cfg.model, vocab_size, cfg.objective)
    if start is not None:
        checkpoint.load_weights(start.checkpoint, model)  # safetensors' loader re-ties shared embeddings
    if dist.is_main:
        params = sum(p.numel() for p in model.parameters())
        console.print(
            f"[bold]ptm pretrain[/] {recipe}: {cfg.model.family} {params / 1e6:.1f}M params, vocab {vocab_size:,}, "
            f"{cfg.objective.name} on {cfg.data.name} ({n_train_docs:,} train / {n_val_docs:,} val documents -> "
            f"{len(train_ex):,} / {len(val_ex):,} sequences of <= {cfg.data.max_seq_len}), {hw.device} {hw.dtype}, "
            f"{dist.world_size} process(es)" + (f"\n  from {start.source}" if start else "") + f"\n  run dir: {run_dir}"
        )
    job = Job(
        model=model,
        objective=OBJECTIVES[cfg.objective.name](cfg.objective),
        train=train_ex,
        val=val_ex,
        model_spec=spec,
    )
    metrics = train(job, cfg.trainer, cfg.optimizer, hw, dist, run_dir, resume_from, compile=cfg.hardware.compile)
    if dist.is_main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        console.print(f"[bold green]done[/] step {cfg.trainer.max_steps}: {shown}\n  run dir: {run_dir}")
    return metrics
