"""`ptm pretrain`: check the config, build data, model and objective, hand them to the loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer

from ptmcli import checkpoint, hardware, hf, rundir, runfiles
from ptmcli.architectures import a_family
from ptmcli.data import corpus_cache, token_dir
from ptmcli.data.lm_examples import CausalExamples, PermutationExamples, SentenceExamples
from ptmcli.data.pretraining import PretrainingExamples, build_chunks
from ptmcli.data.seq2seq_examples import DenoisingExamples, SpanCorruptionExamples
from ptmcli.data.tokenizer import get_tokenizer, load_tokenizer
from ptmcli.distributed import Dist, init_from_env
from ptmcli.errors import PtmError
from ptmcli.loop import Job, check_metric, train
from ptmcli.models import ENCODERS, PRETRAINING_MODELS
from ptmcli.models.heads import SentenceEncoder
from ptmcli.objectives import OBJECTIVES
from ptmcli.runlog import console, counted, preparing
from ptmcli.schema import (
    FAMILY_OBJECTIVES,
    TRAINING_ONLY_FIELDS,
    PretrainConfig,
    architecture_spec,
    check_consistency,
    check_pretrain,
)
from ptmcli.weights import Pretrained, hf_directory, load_pretrained

# ELECTRA's generator sizes and embedding sharing, which a discriminator-only checkpoint does not give
GENERATOR_FIELDS = (
    "generator_hidden_size",
    "generator_num_heads",
    "generator_intermediate_size",
    "share_embeddings",
    "share_all_weights",
)
# objective -> packing layout of its sequences (see data.pretraining.LAYOUTS)
LAYOUT = {
    "mlm-nsp": "sentences",
    "mlm": "blocks-cls-sep",
    "rtd": "blocks-cls-sep",
    "plm": "blocks-cls-sep",
    "clm": "blocks",
    "span-corruption": "blocks",
    "denoise": "sentences",
    "simcse": "sentences",
}
# objectives whose tokenizer must have a mask token
MASKING_OBJECTIVES = ("mlm", "mlm-nsp", "rtd", "denoise")


def make_examples(cfg: PretrainConfig, chunks, tokenizer):
    o, seed = cfg.objective, cfg.trainer.seed
    if o.name == "clm":
        return CausalExamples(chunks, tokenizer)
    if o.name == "simcse":
        return SentenceExamples(chunks, tokenizer)
    if o.name == "plm":
        return PermutationExamples(chunks, tokenizer, o, seed)
    if o.name == "span-corruption":
        return SpanCorruptionExamples(chunks, tokenizer, o, seed)
    if o.name == "denoise":
        return DenoisingExamples(chunks, tokenizer, o, seed)
    return PretrainingExamples(chunks, tokenizer, o, seed, nsp=o.name == "mlm-nsp")


class Corpus(NamedTuple):
    tokenizer: Tokenizer
    chunks: dict  # split -> packed sequences (build_chunks' dataset, or a token directory's TokenBlocks)
    documents: dict[str, int]  # split -> documents it was packed from
    fingerprint: str  # of the source documents (datasets' fingerprint)


def prepare_chunks(cfg: PretrainConfig, dist: Dist, tokenizer=None) -> Corpus:
    """The packed corpus from data.source. Rank 0 prepares first, then the
    first process of each other node (whose datasets cache may be its own disk, or the shared one rank 0 filled),
    then the rest, so no two processes write one cache at once. `tokenizer` is init's; without one,
    data.tokenizer is loaded or a tokenizer is trained."""
    # datasets (with pandas and pyarrow, ~100 MB and 0.6 s) is loaded here, where a corpus is read and packed, so a
    # run from a token directory (data.tokens) does without it
    import datasets

    from ptmcli.data.sources import load_documents, split_documents

    datasets.disable_progress_bars()  # one summary line says what preparation produced
    first_on_node = dist.local_rank == 0 and not dist.is_main
    if not dist.is_main:
        dist.barrier()
        if not first_on_node:
            dist.barrier()
    with preparing(f"reading {cfg.data.name}", dist.is_main):
        docs = load_documents(cfg.data)
        train_docs, val_docs = split_documents(docs, cfg.data)
    training = tokenizer is None and not cfg.data.tokenizer
    what = (
        f"training a {cfg.data.vocab_size:,}-token {cfg.data.tokenizer_kind} tokenizer on {len(train_docs):,} documents"
    )
    with counted(what, dist.is_main and training) as bars:
        tokenizer = get_tokenizer(
            train_docs,
            cfg.data,
            need_mask=cfg.objective.name in MASKING_OBJECTIVES,
            given=tokenizer,
            show_progress=bars,
        )
    chunks = {}
    for name, d in (("train", train_docs), ("val", val_docs)):
        what = f"tokenizing and packing {len(d):,} {name} documents into sequences of <= {cfg.data.max_seq_len}"
        with counted(what, dist.is_main):
            chunks[name] = build_chunks(
                d, tokenizer, cfg.data.max_seq_len, LAYOUT[cfg.objective.name], cfg.data.num_proc,
                cfg.data.word_segmenter,
            )  # fmt: skip
    if dist.is_main or first_on_node:
        dist.barrier()
        if dist.is_main:
            dist.barrier()
    return Corpus(tokenizer, chunks, {"train": len(train_docs), "val": len(val_docs)}, docs._fingerprint)


def token_chunks(cfg: PretrainConfig, tokenizer=None, directory: Path | None = None) -> Corpus:
    """The packed corpus in the token directory data.tokens (or `directory`), after checking it fits the run."""
    directory = directory or Path(cfg.data.tokens).expanduser()
    manifest = token_dir.read_manifest(directory)
    token_dir.check(directory, manifest, LAYOUT[cfg.objective.name], cfg.data.max_seq_len, cfg.objective.name)
    stored, chunks = token_dir.open_splits(directory, manifest)
    if tokenizer is not None:
        token_dir.check_tokenizer(directory, manifest, tokenizer, f"init={cfg.init}")
    elif cfg.data.tokenizer:
        token_dir.check_tokenizer(
            directory,
            manifest,
            load_tokenizer(cfg.data.tokenizer, cfg.data.lowercase),
            f"data.tokenizer={cfg.data.tokenizer}",
        )
    tokenizer = get_tokenizer(
        None, cfg.data, need_mask=cfg.objective.name in MASKING_OBJECTIVES, given=tokenizer or stored
    )
    documents = {s: manifest["splits"][s]["documents"] for s in token_dir.SPLITS}
    return Corpus(tokenizer, chunks, documents, manifest["source"].get("fingerprint", ""))


def kept_or_prepared_chunks(cfg: PretrainConfig, dist: Dist, tokenizer=None) -> Corpus:
    """The packed corpus from data.source: from ptm's cache when an earlier run with the same data settings kept it
    there (see corpus_cache), else prepared, and kept for the next run; neither with data.keep_corpus=false. Only a
    single process keeps and reuses corpora: the processes of a distributed run must all take the same path, and
    their caches may be on different disks (they share a `ptm prepare` directory instead, docs/distributed.md)."""
    layout = LAYOUT[cfg.objective.name]
    keeps = cfg.data.keep_corpus and dist.world_size == 1
    kept = corpus_cache.directory(cfg.data, cfg.objective.name, layout, tokenizer) if keeps else None
    if kept is not None and kept.exists():
        try:
            corpus = token_chunks(cfg, tokenizer, kept)
            console.print(f"data: the packed corpus an earlier run with these settings kept in {kept}")
            return corpus
        except PtmError:  # damaged: prepare it again
            corpus_cache.discard(kept)
    corpus = prepare_chunks(cfg, dist, tokenizer)
    if kept is not None:
        corpus_cache.keep(
            kept, corpus.tokenizer, corpus.chunks, corpus.documents, layout, cfg.data.max_seq_len, corpus.fingerprint
        )
    return corpus


def build_examples(cfg: PretrainConfig, dist: Dist, tokenizer=None) -> tuple:
    """(tokenizer, train examples, validation examples, (train documents, validation documents))."""
    corpus = token_chunks(cfg, tokenizer) if cfg.data.tokens else kept_or_prepared_chunks(cfg, dist, tokenizer)
    return (
        corpus.tokenizer,
        *(make_examples(cfg, corpus.chunks[s], corpus.tokenizer) for s in ("train", "val")),
        (corpus.documents["train"], corpus.documents["val"]),
    )


def model_spec(cfg: PretrainConfig, vocab_size: int) -> dict:
    return {**architecture_spec(cfg.model), "vocab_size": vocab_size, "objective": cfg.objective.name}


def from_hf(cfg: PretrainConfig, arch, with_generator: bool) -> Any:
    """A Hugging Face init brings its architecture: the recipe's sizes give way, its training settings stay (and
    an ELECTRA discriminator without its generator keeps the recipe's generator sizes)."""
    family = arch.family
    if family != cfg.model.family or cfg.objective.name not in FAMILY_OBJECTIVES[family]:
        raise PtmError(
            f"init={cfg.init} is a Hugging Face model of ptm's {family} family, which pretrains with objective="
            f"{' or '.join(FAMILY_OBJECTIVES[family])}; this config trains {a_family(cfg.model.family)} model with "
            f"objective={cfg.objective.name}. Pick {a_family(family)} recipe (see `ptm pretrain --help`)."
        )
    kept = [*TRAINING_ONLY_FIELDS, *([] if with_generator else GENERATOR_FIELDS)]
    return dataclasses.replace(arch, **{k: getattr(cfg.model, k) for k in kept if hasattr(cfg.model, k)})


def adopt_architecture(cfg: PretrainConfig, raw_cfg: dict, run_dir: Path, resume_from, dist) -> tuple:
    """(config, config in force) when init= is a Hugging Face model, whose architecture the run takes; on resume,
    the architecture the run recorded (the init directory may have moved since)."""
    if not cfg.init:
        return cfg, raw_cfg
    if resume_from is None:
        directory = hf_directory(cfg.init)
        if directory is None:
            return cfg, raw_cfg
        _, arch, generator = hf.read_arch(directory, f"init={cfg.init}")
        adopted = from_hf(cfg, arch, generator is not None)
    else:
        recorded = runfiles.config(run_dir, "resume").get("model", {})
        adopted = check_pretrain(
            {
                **raw_cfg,
                "model": {
                    **recorded,
                    **{k: raw_cfg["model"][k] for k in TRAINING_ONLY_FIELDS if k in raw_cfg["model"]},
                },
            }
        ).model
    changed = checkpoint.spec_diffs(architecture_spec(adopted), architecture_spec(cfg.model))
    if not changed:
        return cfg, raw_cfg
    if dist.is_main and resume_from is None:
        console.print(
            f"init={cfg.init} brings its architecture: {'; '.join(changed)}".replace(" vs config ", " vs recipe ")
        )
    cfg = dataclasses.replace(cfg, model=adopted)
    check_consistency(cfg)
    return cfg, {**raw_cfg, "model": dataclasses.asdict(adopted)}


def load_init(cfg: PretrainConfig) -> Pretrained:
    """The pretraining run named by init=, after checking it has this config's architecture and objective."""
    start = load_pretrained(cfg.init)
    if start.checkpoint is None:  # a Hugging Face model: its architecture was adopted (from_hf)
        return start
    saved_objective = (
        checkpoint.read_state(start.checkpoint).get("model", {}).get("objective") if start.checkpoint else None
    )
    fine_tuned = saved_objective is None and cfg.objective.name == "simcse"  # SimCSE takes any encoder of the family
    if (saved_objective is None and not fine_tuned) or start.family != cfg.model.family:
        raise PtmError(
            f"init={cfg.init} is {start.source}, not a ptm pretraining run of {a_family(cfg.model.family)} model. "
            f"init= continues pretraining from a run of `ptm pretrain`; to fine-tune, use `ptm finetune init=...`."
        )
    if saved_objective != cfg.objective.name and cfg.objective.name != "simcse":  # its heads belong to it
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


def pretraining_model(cfg: PretrainConfig, vocab_size: int) -> torch.nn.Module:
    """The family's pretraining model for its objective; for SimCSE, its bare encoder under a pooling head."""
    if cfg.objective.name != "simcse":
        return PRETRAINING_MODELS[cfg.model.family](cfg.model, vocab_size, cfg.objective)
    encoder = ENCODERS[cfg.model.family](cfg.model, vocab_size)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # SimCSE pools on its own; a parameter no forward uses would stall DDP
    return SentenceEncoder(encoder, cfg.objective.pooling, cfg.objective.projection)


def load_sentence_encoder(model: SentenceEncoder, start: Pretrained) -> tuple[list[str], list[str]]:
    """init= a ptm run for SimCSE: another SimCSE run gives everything, any other run of the family its encoder
    (the projection starts fresh). Returns (fresh, unused) module keys, as for a Hugging Face init."""
    if checkpoint.read_state(start.checkpoint).get("model", {}).get("objective") == "simcse":
        checkpoint.load_weights(start.checkpoint, model)
        return [], []
    missing, unexpected = model.encoder.load_state_dict(start.encoder_state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise PtmError(
            f"init={start.source} does not hold a whole {start.family} encoder (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})."
        )
    fresh = [k for k in model.state_dict() if k.startswith("projection.")]
    unused = [k for k in start.model_state if not k.startswith("encoder.") or k.startswith("encoder.pooler.")]
    return fresh, unused


def check_same_tokenizer(cfg: PretrainConfig, brought: Tokenizer) -> None:
    """data.tokenizer beside init= (a recipe may name one) must be the tokenizer init brings."""
    try:
        same = load_tokenizer(cfg.data.tokenizer, cfg.data.lowercase).get_vocab() == brought.get_vocab()
    except PtmError:
        same = False
    if not same:
        raise PtmError(
            f"init={cfg.init} brings the tokenizer its weights were trained with, and data.tokenizer="
            f"{cfg.data.tokenizer} names another; drop data.tokenizer (data.tokenizer=null)."
        )


def _modules(keys: list[str]) -> str:
    """'mlm_head.dense.weight', 'encoder.pooler.bias', ... -> 'mlm_head, encoder.pooler'"""
    return ", ".join(
        sorted({".".join(k.split(".")[:2]) if k.startswith("encoder.") else k.split(".")[0] for k in keys})
    )


def pretrain(
    raw_cfg: dict, run_dir: Path, recipe: str, named_dir: bool = False, hydra_files: dict | None = None
) -> dict[str, float]:
    """`named_dir`: the user named the run directory; `hydra_files`: Hydra's record of the invocation (see rundir)."""
    cfg = check_pretrain(raw_cfg)
    dist = init_from_env()
    hw = hardware.resolve(cfg.hardware, dist)
    run_dir, resume_from = rundir.prepare(run_dir, raw_cfg, "pretrain", recipe, dist, named_dir)
    cfg, in_force = adopt_architecture(cfg, raw_cfg, run_dir, resume_from, dist)
    start = load_init(cfg) if cfg.init and resume_from is None else None
    given = start.tokenizer if start else None
    if start and cfg.data.tokenizer:
        check_same_tokenizer(cfg, start.tokenizer)
    if cfg.init and resume_from is not None:  # the tokenizer init lent this run was saved beside it
        given = runfiles.tokenizer(run_dir, "resume")
    tokenizer, train_ex, val_ex, (n_train_docs, n_val_docs) = build_examples(cfg, dist, given)
    vocab_size = tokenizer.get_vocab_size()
    spec = model_spec(cfg, vocab_size)
    if resume_from is not None:
        checkpoint.check_architecture(resume_from, checkpoint.read_state(resume_from).get("model", {}), spec)
    objective = OBJECTIVES[cfg.objective.name](cfg.objective)
    check_metric(objective, cfg.trainer.metric)
    rundir.record(
        run_dir,
        raw_cfg,
        "pretrain",
        recipe,
        dist,
        in_force=in_force,
        fresh=resume_from is None,
        hydra_files=hydra_files,
    )
    if dist.is_main:
        tokenizer.save(str(run_dir / "tokenizer.json"))

    torch.manual_seed(cfg.trainer.seed)
    model = pretraining_model(cfg, vocab_size)
    fresh, unused = [], []
    if start is not None and start.checkpoint is not None and isinstance(model, SentenceEncoder):
        fresh, unused = load_sentence_encoder(model, start)
    elif start is not None and start.checkpoint is not None:
        checkpoint.load_weights(start.checkpoint, model)  # safetensors' loader re-ties shared embeddings
    elif start is not None:
        fresh, unused = hf.load_into(model, start.model_state, f"init={cfg.init}")
    if dist.is_main:
        params = sum(p.numel() for p in model.parameters())
        console.print(
            f"[bold]ptm pretrain[/] {recipe}: {cfg.model.family} {params / 1e6:.1f}M params, vocab {vocab_size:,}, "
            f"{cfg.objective.name} on {cfg.data.name} ({n_train_docs:,} train / {n_val_docs:,} val documents -> "
            f"{len(train_ex):,} / {len(val_ex):,} sequences of <= {cfg.data.max_seq_len}), {hw.device} {hw.dtype}, "
            f"{dist.world_size} process(es)"
            + (f"\n  from {start.source}" if start else "")
            + (f" ({start.load_seconds:.1f} s)" if start and start.load_seconds else "")
            + (f"\n  not in the checkpoint, initialised fresh: {_modules(fresh)}" if fresh else "")
            + (
                f"\n  in the checkpoint, not used by objective={cfg.objective.name}: {_modules(unused)}"
                if unused
                else ""
            )
            + f"\n  run dir: {run_dir}"
        )
    job = Job(
        model=model,
        objective=objective,
        train=train_ex,
        val=val_ex,
        model_spec=spec,
    )
    metrics = train(job, cfg.trainer, cfg.optimizer, hw, dist, run_dir, resume_from, scale=cfg.hardware)
    if dist.is_main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        last = checkpoint.latest(run_dir / "checkpoints")  # an early stop ends before max_steps
        step = last.name.removeprefix("step-") if last is not None else cfg.trainer.max_steps
        console.print(f"[bold green]done[/] step {step}: {shown}\n  run dir: {run_dir}")
    return metrics
