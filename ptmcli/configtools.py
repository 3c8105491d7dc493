"""Tools that look at configs without training: `ptm ls` (what there is to choose), `ptm cat` (a composed, checked
config with each key's help), `ptm validate` (every check a run makes before it trains, data and init included),
`ptm pretrain --help` (groups, options and every key's default and meaning), and the check of every job of a -m
sweep before the first one runs."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml
from rich.markup import escape

from ptmcli.compose import COMMANDS, Invocation, checked, group_options, parse, recipes, sweep_jobs
from ptmcli.confdirs import config_dirs
from ptmcli.errors import PtmError
from ptmcli.loggers import check as check_loggers
from ptmcli.preflight import check_paths
from ptmcli.runlog import console
from ptmcli.schema import MODEL_SCHEMAS, TRANSFER_SCHEMAS


def first_comment(path: Path) -> str:
    """A config file's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("# ").strip()
    return ""


def list_configs() -> None:
    """`ptm ls`: recipes, tasks and every group's options, one line each with its description."""
    import shutil

    conf, recipe_dir = config_dirs()
    width = max(shutil.get_terminal_size((120, 24)).columns, 80)
    sections = {"recipes (ptm pretrain conf=NAME)": {n: recipe_dir / f"{n}.yaml" for n in recipes()}}
    groups = dict.fromkeys(g for command in COMMANDS.values() for g in command.groups)
    for group in sorted(groups, key=lambda g: (g != "task", g)):
        users = "|".join(n for n, c in COMMANDS.items() if group in c.groups)
        sections[f"{group} (ptm {users} {group}=NAME)"] = {o: conf / group / f"{o}.yaml" for o in group_options(group)}
    for title, options in sections.items():
        print(title)
        for name, path in options.items():
            # a recipe's first line is `ptm pretrain conf=NAME -- what it is`
            text = first_comment(path).partition(" -- ")[2] or first_comment(path)
            line = f"  {name:<20} {text}"
            print(line if len(line) <= width else line[: width - 1] + "…")
        print()
    print("ptm cat conf=NAME | task=NAME [key=value ...] prints one composed config; ptm validate checks one.")


def invocation_of(args: list[str]) -> Invocation:
    """`[pretrain|finetune] [conf=R | task=T] [overrides]`: the command is named, or finetune when a task or
    transfer is chosen, else pretrain."""
    if args and args[0] in COMMANDS:
        return parse(args[0], args[1:])
    finetune = any(a.partition("=")[0].lstrip("+") in ("task", "transfer") for a in args)
    return parse("finetune" if finetune else "pretrain", [a for a in args if not a.startswith("hydra.")])


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


def _section_lines(name: str, section, indent: str = "") -> list[str]:
    lines = [f"{indent}{name}:"]
    for f in dataclasses.fields(section):
        help_text = f.metadata.get("help", "")
        value = _value(getattr(section, f.name))
        lines.append(f"{indent}  {f.name}: {value}" + (f"  # {help_text}" if help_text else ""))
    return lines


def as_commented_yaml(typed, schema: type) -> str:
    """A checked config as YAML, each key followed by its help. A multi-task run shows its tasks' sections under
    tasks: (the top-level task and data sections are not used there)."""
    lines = []
    multi = getattr(typed, "tasks", None) is not None
    for f in dataclasses.fields(schema):
        value = getattr(typed, f.name)
        if multi and f.name in ("task", "data"):
            continue
        if f.name == "tasks" and multi:
            lines.append(
                "tasks:  # one head per task on a shared encoder; only metric and metric_mode of trainer count"
            )
            for name, entry in value.items():
                lines.append(f"  {name}:")
                for section in dataclasses.fields(entry):
                    lines += _section_lines(section.name, getattr(entry, section.name), "    ")
        elif dataclasses.is_dataclass(value):
            lines += _section_lines(f.name, value)
        else:
            help_text = f.metadata.get("help", "")
            lines.append(f"{f.name}: {_value(value)}" + (f"  # {help_text}" if help_text else ""))
    return "\n".join(lines) + "\n"


def cat(args: list[str]) -> None:
    """`ptm cat`: the composed config, after every schema check, as commented YAML on stdout."""
    invocation = invocation_of(args)
    _, typed = checked(invocation)
    shown = " ".join(args)
    print(f"# ptm {invocation.command} {shown}".rstrip() + " -- composed and checked; each key's help follows it")
    print(as_commented_yaml(typed, COMMANDS[invocation.command].schema), end="")


def validate(args: list[str]) -> None:
    """`ptm validate`: the checks a run makes before training -- config, paths, data, labels, tokenizer, init and
    resume target -- without training or writing anything."""
    import datasets

    started = time.perf_counter()
    invocation = invocation_of(args)
    raw, cfg = checked(invocation)
    found = check_paths(cfg)
    check_loggers(cfg.trainer.loggers)
    datasets.disable_progress_bars()
    facts = validate_pretrain(cfg) if invocation.command == "pretrain" else validate_finetune(cfg)
    if cfg.resume not in (None, "auto"):
        from ptmcli import checkpoint, rundir

        _, target = rundir.run_of(cfg.resume)
        found_ckpt = checkpoint.verified(target) if (target / checkpoint.MARKER).exists() else None
        found_ckpt = found_ckpt or checkpoint.newest_intact(target, [])
        if found_ckpt is None:
            raise PtmError(f"resume={cfg.resume}: no intact checkpoint under '{target}'.")
        facts.append(f"resume from {found_ckpt}")
    console.print(
        "[bold green]ok[/] "
        + escape(f"ptm {invocation.command} {' '.join(args)}: " + "; ".join([*facts, *found]))
        + f". Checked in {time.perf_counter() - started:.1f} s; no run directory was written.",
        soft_wrap=True,
    )


def validate_pretrain(cfg) -> list[str]:
    from ptmcli import hf
    from ptmcli.data.sources import load_documents, split_documents
    from ptmcli.data.tokenizer import load_tokenizer
    from ptmcli.pretrain import check_same_tokenizer, from_hf, load_init
    from ptmcli.weights import hf_directory

    facts = [f"{cfg.model.family} model, objective {cfg.objective.name}"]
    if cfg.init:
        directory = hf_directory(cfg.init)
        if directory is not None:
            _, arch, generator = hf.read_arch(directory, f"init={cfg.init}")
            cfg = dataclasses.replace(cfg, model=from_hf(cfg, arch, generator is not None))
        start = load_init(cfg)
        if cfg.data.tokenizer:
            check_same_tokenizer(cfg, start.tokenizer)
        facts.append(f"init from {start.source}")
    elif cfg.data.tokenizer:
        facts.append(f"tokenizer of {load_tokenizer(cfg.data.tokenizer, cfg.data.lowercase).get_vocab_size():,} tokens")
    if cfg.data.tokens:
        from ptmcli.pretrain import token_chunks

        corpus = token_chunks(cfg, start.tokenizer if cfg.init else None)
        sizes = " / ".join(f"{len(corpus.chunks[s]):,}" for s in ("train", "val"))
        facts.append(f"data.tokens={cfg.data.tokens}: {sizes} train / validation sequences")
    elif cfg.data.source.startswith("hf:"):
        facts.append(f"data.source={cfg.data.source} is fetched when the run starts (not checked offline)")
    else:
        train, val = split_documents(load_documents(cfg.data), cfg.data)
        facts.append(f"data {cfg.data.name}: {len(train):,} train / {len(val):,} validation documents")
    return facts


def validate_finetune(cfg) -> list[str]:
    from ptmcli.data.labeled import label_names, load_splits
    from ptmcli.finetune import check_labels, check_lengths, scratch, writes_text
    from ptmcli.weights import load_pretrained

    facts, texts, kinds, where = [], [], [], {}
    for name, entry in cfg.entries().items():
        where[name], kind = f"tasks.{name}." if cfg.tasks else "", entry.task.kind
        splits = load_splits(entry.data, kind)
        labels = label_names(splits, kind, entry.task.labels, entry.data.name)
        check_labels(entry, labels, where[name])
        sizes = " / ".join(f"{len(splits[s]):,}" for s in ("train", "validation", "test"))
        facts.append(
            f"task {entry.data.name} ({kind}{f', {len(labels)} labels' if labels else ''}): {sizes} train/val/test "
            f"examples"
        )
        texts += [r.get("text", "") for r in splits["train"]]
        kinds.append(kind)
    pretrained = load_pretrained(cfg.init) if cfg.init else scratch(cfg, texts)
    writes_text(kinds, cfg.transfer.mode, pretrained.family)
    for name, entry in cfg.entries().items():
        check_lengths(entry.task, pretrained, where[name])
    return [*facts, f"init {pretrained.source}"]


def check_sweep(invocation: Invocation) -> None:
    """A -m sweep: every job's config passes the checks a run makes at its start before the first job trains, so
    that a bad value for the last job does not stop the sweep hours in. (Another sweeper plugin expands its own.)"""
    if not {"-m", "--multirun"} & set(invocation.flags) or any(
        o.startswith("hydra/sweeper=") for o in invocation.overrides
    ):
        return
    jobs = sweep_jobs(invocation.overrides)
    common = set.intersection(*map(set, jobs))
    for number, job in enumerate(jobs):
        try:
            _, typed = checked(dataclasses.replace(invocation, overrides=job))
            check_paths(typed)
            check_loggers(typed.trainer.loggers)
        except PtmError as err:
            varied = " ".join(o for o in job if o not in common)
            raise PtmError(f"Job {number} of the sweep ({varied}), checked before any job runs: {err}") from None


def print_help(name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    command = COMMANDS[name]
    console = Console()
    usage = escape("[conf=RECIPE] [group=option ...] [key=value ...] [-m] [--cfg job]")  # brackets, not markup
    console.print(f"[bold]ptm {name}[/] {usage}\n")
    if name == "pretrain":
        table = Table("recipe (conf=)", "what it is", box=None)
        for recipe, line in recipes().items():
            table.add_row(recipe, line)
        console.print(table)
    table = Table("group", "options", box=None)
    for group in command.groups:
        table.add_row(group, ", ".join(group_options(group)))
    console.print(table)
    sections = {f"model (family={family})": schema for family, schema in MODEL_SCHEMAS.items()}
    sections.update(command.sections)
    if name == "finetune":
        sections.update({f"transfer={mode}": schema for mode, schema in TRANSFER_SCHEMAS.items()})
    for section, schema in sections.items():
        prefix = section.split("=")[0].split(" ")[0]
        table = Table(f"{section}: KEY", "default", "meaning", box=None)
        for f in dataclasses.fields(schema):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            table.add_row(f"{prefix}.{f.name}", repr(default), f.metadata.get("help", ""))
        console.print(table)
    for f in dataclasses.fields(command.schema):
        if f.name not in sections:
            console.print(f"{f.name}=...  {f.metadata.get('help', '')}")
    if name == "finetune":
        console.print(
            "Training length: a task file sets trainer.epochs; trainer.max_steps=N on the command line replaces it "
            "(giving both trainer.epochs and trainer.max_steps on the command line is refused).\n"
            "task=path/to/my_task.yaml uses a task file of your own (same keys as conf/task/*.yaml).\n"
            "task=\\[news-cls,sentiment] trains one encoder with a head per task; each task's keys are under "
            "tasks.NAME (tasks.sentiment.task.max_seq_len=64), batches drawn by mixture.*.\n"
            "objective=simcse-supervised (task.objective) trains sentence vectors from a pair-cls task's labelled "
            "pairs."
        )
    console.print(
        "Hydra flags: -m (sweep: optimizer.lr=1e-4,5e-4), --cfg job, hydra.run.dir=DIR, --shell-completion install=bash"
    )
