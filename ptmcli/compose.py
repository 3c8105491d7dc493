"""From a command line to a checked config: the commands' config groups, recipes and task files, the checks on
each override, and Hydra's compose API for the tools that only look at a config (`ptm cat`, `ptm validate`,
the docs test). `ptm pretrain` and `ptm finetune` parse their command line here too. No torch here."""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptmcli.confdirs import config_dirs
from ptmcli.errors import PtmError
from ptmcli.files import read_text, read_yaml
from ptmcli.finetune_checks import ENTRY_SECTIONS, check_finetune
from ptmcli.hydra_args import check_hydra_override, split_flags
from ptmcli.schema import (
    FINETUNE_SECTIONS,
    MODEL_SCHEMAS,
    SECTIONS,
    TRANSFER_SCHEMAS,
    FinetuneConfig,
    PretrainConfig,
    check_pretrain,
)
from ptmcli.typecheck import did_you_mean


@dataclass(frozen=True)
class Command:
    """A Hydra-driven command: its base config in conf/, default recipe, schema and config groups."""

    base: str
    default_recipe: str
    schema: type
    sections: dict
    groups: tuple[str, ...]
    summary: str


COMMANDS = {
    "pretrain": Command(
        "pretrain",
        "demo",
        PretrainConfig,
        SECTIONS,
        ("model", "objective", "data", "optimizer", "hardware"),
        "self-supervised pretraining",
    ),
    "finetune": Command(
        "finetune",
        "finetune",
        FinetuneConfig,
        FINETUNE_SECTIONS,
        ("task", "transfer", "model", "optimizer", "hardware"),
        "supervised fine-tuning",
    ),
}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dirs()[0] / group).glob("*.yaml"))


def recipes() -> dict[str, str]:
    """recipe name -> first comment line of its file."""
    out = {}
    for path in sorted(config_dirs()[1].glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def register_defaults() -> None:
    """Give every schema key its default in Hydra's ConfigStore, so any key can be overridden even when a group
    file leaves it out. Plain dicts, not typed nodes: type errors are reported by our checker, not by OmegaConf."""
    from hydra.core.config_store import ConfigStore

    for name, command in COMMANDS.items():
        defaults = {key: dataclasses.asdict(schema()) for key, schema in command.sections.items()}
        # transfer keys depend on the method, so the transfer/ group file lists all of its own
        extra = {f.name: None for f in dataclasses.fields(command.schema) if f.name not in defaults}
        ConfigStore.instance().store(name=f"ptm_{name}_defaults", node={**defaults, **extra})


def check_override(arg: str, command: Command) -> None:
    """Fail early, with a did-you-mean, on an override naming an unknown group option or key."""
    key, has_value, value = arg.lstrip("+~").partition("=")
    if key.startswith("hydra") or not (has_value or arg.startswith("~")):
        return
    if key in command.groups:
        options = group_options(key)
        for choice in value.split(",") if has_value else []:
            if choice not in options and not (key == "model" and choice == "null"):
                raise PtmError(
                    f"'{choice}' is not an option of the '{key}' group.{did_you_mean(choice, options)} "
                    f"Valid options: {', '.join(options)}."
                )
        return
    head, _, rest = key.partition(".")
    top = {f.name for f in dataclasses.fields(command.schema)}
    if head not in top:
        raise PtmError(f"Unknown key '{key}'.{did_you_mean(head, top)} Valid top-level keys: {', '.join(sorted(top))}.")
    if head in ("model", "transfer"):
        schemas = MODEL_SCHEMAS if head == "model" else TRANSFER_SCHEMAS
        fields = {f.name for schema in schemas.values() for f in dataclasses.fields(schema)}
    elif head in command.sections:
        fields = {f.name for f in dataclasses.fields(command.sections[head])}
    else:
        return
    if not rest:  # `trainer=...` or `~trainer`: a section is not a group option to choose, nor optional
        raise PtmError(
            f"{arg}: '{head}' is a section of keys, not a choice; set a key of it, e.g. {head}."
            f"{sorted(fields)[0]}=... Valid keys of '{head}': {', '.join(sorted(fields))}."
        )
    name = rest.split(".")[0]
    if name not in fields:
        # a key this command keeps in another section (fine-tuning's input length is task.max_seq_len)
        elsewhere = [
            f"{other}.{name}"
            for other, section in command.sections.items()
            if other != head and name in {f.name for f in dataclasses.fields(section)}
        ]
        hint = f" Did you mean '{elsewhere[0]}'?" if elsewhere else did_you_mean(rest, fields)
        raise PtmError(f"Unknown key '{key}'.{hint} Valid keys of '{head}': {', '.join(sorted(fields))}.")
    if arg.startswith("~"):  # every key of a typed section exists; Hydra's own refusal names no fix
        raise PtmError(
            f"{arg}: a key of '{head}' cannot be removed, only set: {key}=VALUE (`ptm cat` shows its value and help)."
        )


def user_task(value: str, top_keys: set[str]) -> tuple[str, Path]:
    """task=path/to/file.yaml: (the option name, a config folder holding it as task/NAME.yaml), so that Hydra composes
    it as it would a shipped task. A file without `# @package _global_` gets it: task files set top-level keys."""
    path = Path(value).expanduser()
    content = read_yaml(path, "task")
    if not isinstance(content, dict) or not content:
        raise PtmError(
            f"task='{path}' should be a YAML mapping of config sections (task:, data:, trainer:, ...), like the "
            f"files in conf/task/; it is {'empty' if not content else type(content).__name__}."
        )
    unknown = sorted(str(k) for k in content if k not in top_keys)  # hydra: and defaults: too, which could run code
    if unknown:
        raise PtmError(
            f"task='{path}' sets unknown section(s) {', '.join(unknown)}.{did_you_mean(unknown[0], top_keys)} A task "
            f"file sets: {', '.join(sorted(top_keys))}."
        )
    folder = Path(tempfile.mkdtemp(prefix="ptm-task-"))
    atexit.register(shutil.rmtree, folder, True)
    name = path.stem if path.stem not in group_options("task") else f"{path.stem}-file"
    text = read_text(path, "task")
    header = "" if text.lstrip().startswith("# @package _global_") else "# @package _global_\n"
    (folder / "task").mkdir()
    (folder / "task" / f"{name}.yaml").write_text(header + text)
    return name, folder


def task_list(value: str, top_keys: set[str], search: list[Path]) -> tuple[str, list[str]]:
    """task=[a,b,...]: a multi-task run. Writes a task file (its option name is returned, with the tasks' names)
    that puts each task's file under tasks.NAME and takes the run's trainer and optimizer sections from the first
    task, scored by the mean of the tasks' own metrics. Task files of one's own may be listed too."""
    names = []
    for item in (v.strip().strip("'\"") for v in value.strip()[1:-1].split(",")):
        if not item:
            continue
        if item.endswith((".yaml", ".yml")) or "/" in item:
            item, folder = user_task(item, top_keys)
            search.append(folder)
        elif item not in group_options("task"):
            options = group_options("task")
            raise PtmError(
                f"task={value}: '{item}' is not a task.{did_you_mean(item, options)} Tasks: {', '.join(options)}."
            )
        if item in names:
            raise PtmError(f"task={value} names '{item}' twice; list each task once.")
        names.append(item)
    if not names:
        raise PtmError("task=[] lists no task; give one or more, e.g. task=[news-cls,sentiment].")
    files = {
        name: next(
            f / "task" / f"{name}.yaml" for f in [config_dirs()[0], *search] if (f / "task" / f"{name}.yaml").exists()
        )
        for name in names
    }
    sections = {name: read_yaml(path, "task") or {} for name, path in files.items()}
    trainer = dict(sections[names[0]].get("trainer") or {})
    modes = {(s.get("trainer") or {}).get("metric_mode", "min") for s in sections.values()}
    if len(modes) == 1:  # otherwise the first task's metric picks checkpoints (a mean of max and min makes no sense)
        trainer.update(metric="val/mean", metric_mode=modes.pop())
    else:
        trainer.update(metric=f"val/{names[0]}/{trainer.get('metric', 'val/loss').removeprefix('val/')}")
    # every key of every task at its default first (so that tasks.NAME.KEY=... overrides any key), then the files
    combined = {
        "defaults": ["_self_", *({f"/task@tasks.{name}": name} for name in names)],
        "tasks": {
            name: {key: dataclasses.asdict(schema()) for key, schema in ENTRY_SECTIONS.items()} for name in names
        },
        "data": {"name": "+".join(names)},
        "trainer": trainer,
        "optimizer": sections[names[0]].get("optimizer") or {},
    }
    folder = Path(tempfile.mkdtemp(prefix="ptm-tasks-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / "task").mkdir()
    (folder / "task" / f"{combined['data']['name']}.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump(combined, sort_keys=False)
    )
    search.append(folder)
    return combined["data"]["name"], names


def check_task_keys(overrides: list[str], names: list[str]) -> None:
    """tasks.NAME.SECTION.KEY=... names a listed task and a key of that section (a did-you-mean otherwise)."""
    for arg in overrides:
        key = arg.lstrip("+~").partition("=")[0]
        if not key.startswith("tasks."):
            continue
        parts = key.split(".")
        if len(parts) >= 2 and parts[1] not in names:
            raise PtmError(
                f"Unknown key '{key}': this run's tasks are {', '.join(names)}.{did_you_mean(parts[1], names)}"
            )
        if len(parts) < 4 or parts[2] not in ENTRY_SECTIONS:
            got = parts[2] if len(parts) > 2 else ""
            raise PtmError(
                f"Unknown key '{key}'.{did_you_mean(got, ENTRY_SECTIONS)} Set one key of a task's section: "
                f"tasks.{parts[1]}.SECTION.KEY with SECTION one of {', '.join(ENTRY_SECTIONS)}."
            )
        fields = {f.name for f in dataclasses.fields(ENTRY_SECTIONS[parts[2]])}
        if parts[3] not in fields:
            raise PtmError(
                f"Unknown key '{key}'.{did_you_mean(parts[3], fields)} Valid keys of '{parts[2]}': "
                f"{', '.join(sorted(fields))}."
            )


def training_length(overrides: list[str]) -> list[str]:
    """trainer.max_steps typed on the command line wins over a task file's trainer.epochs (which otherwise decides);
    typing both is refused rather than one silently ignored."""
    given = {a.lstrip("+~").partition("=")[0]: a.partition("=")[2] for a in overrides}
    if "trainer.max_steps" not in given:
        return overrides
    if given.get("trainer.epochs", "null") not in ("null", "None", "~"):
        raise PtmError(
            f"trainer.max_steps={given['trainer.max_steps']} and trainer.epochs={given['trainer.epochs']} both set "
            f"the training length; give one of them."
        )
    return [*overrides, "trainer.epochs=null"] if "trainer.epochs" not in given else overrides


@dataclass
class Invocation:
    """A command line, parsed: the recipe (the primary config), overrides for Hydra, Hydra's flags, and the
    folders Hydra searches besides the primary one (the other shipped folder, a user task file's)."""

    command: str
    recipe: str
    overrides: list[str]
    flags: list[str]
    search: list[Path] = field(default_factory=list)


def parse(name: str, args: list[str]) -> Invocation:
    """Check a `ptm pretrain|finetune` command line: the recipe exists, every override names a known key or group
    option, Hydra gets only allowed flags, a task file is readable, and the training length is unambiguous."""
    command = COMMANDS[name]
    recipe = command.default_recipe
    rest = []
    for arg in args:
        if arg.startswith("conf="):
            recipe = arg.partition("=")[2]
        else:
            rest.append(arg)
    known = recipes()
    if "," in recipe and all(r in known for r in recipe.split(",")):
        raise PtmError(
            f"conf={recipe}: a run has one recipe, and a -m sweep varies keys and groups within it; run each "
            f"conf= on its own, or sweep the groups that differ (e.g. model=bert-mini,bert-small -m)."
        )
    if recipe != command.base and recipe not in known:
        raise PtmError(f"conf={recipe}: no such recipe.{did_you_mean(recipe, known)} Recipes: {', '.join(known)}.")
    overrides, flags = split_flags(rest)
    completing = {"-sc", "--shell-completion"} & set(flags)  # there, install=bash / query=bash are not overrides
    search = [config_dirs()[1] if recipe == command.base else config_dirs()[0]]
    names: list[str] = []  # the tasks of a multi-task run
    for i, arg in enumerate(overrides):
        check_hydra_override(arg)
        key, _, value = arg.partition("=")
        if key == "objective" and name == "finetune":  # the finetune objective is a task key; `objective` is a group
            arg = overrides[i] = f"task.objective={value}"
        if key == "task" and name == "finetune" and value.startswith("["):
            option, names = task_list(value, {f.name for f in dataclasses.fields(command.schema)}, search)
            overrides[i] = f"task={option}"
        elif key == "task" and name == "finetune" and (value.endswith((".yaml", ".yml")) or "/" in value):
            task_name, folder = user_task(value, {f.name for f in dataclasses.fields(command.schema)})
            overrides[i] = f"task={task_name}"
            search.append(folder)
        elif not completing:
            check_override(arg, command)
    if names:
        check_task_keys(overrides, names)
    if names and (shared := [o for o in overrides if o.lstrip("+~").startswith(("task.", "data."))]):
        raise PtmError(
            f"{shared[0]}: with several tasks, each has its own task and data keys; set them under tasks.NAME, e.g. "
            f"tasks.sentiment.{shared[0].lstrip('+~')}."
        )
    if name == "finetune" and not completing:
        overrides = training_length(overrides)
    return Invocation(name, recipe, overrides, flags, search)


def primary_dir(invocation: Invocation) -> Path:
    """Hydra finds the primary config only under config_path; the other folders join through the search path."""
    conf_dir, recipe_dir = config_dirs()
    return conf_dir if invocation.recipe == COMMANDS[invocation.command].base else recipe_dir


def searchpath(invocation: Invocation) -> str:
    return "hydra.searchpath=[" + ",".join(f"file://{folder}" for folder in invocation.search) + "]"


def first_of_sweep(override: str) -> str:
    """`key=a,b,c` (a -m sweep) -> `key=a`: the first job's config. A list value `key=[a,b]` stays whole."""
    key, _, value = override.partition("=")
    if key.startswith("hydra") or value.startswith(("[", "{", "'", '"')):
        return override
    return f"{key}={value.split(',')[0]}"


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides in a -m sweep, as Hydra's basic sweeper expands them: the product of every comma list
    (or choice()/range()), a later override of a key replacing an earlier one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    by_key: dict[str, list[str]] = {}
    try:
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.get_key_element()
            if not override.is_sweep_override():
                by_key[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                by_key[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                raise PtmError(
                    f"{override.input_line}: a -m sweep takes a list of values (a,b,c), choice() or range()."
                )
    except HydraException as err:
        raise PtmError(f"The command line could not be composed: {str(err).splitlines()[0]}") from None
    return [list(job) for job in itertools.product(*by_key.values())]


def compose(invocation: Invocation) -> dict:
    """The composed, resolved config of a parsed command line (no run directory, nothing written)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_defaults()
    if not OmegaConf.has_resolver("ptm_stamp"):
        OmegaConf.register_new_resolver("ptm_stamp", lambda *_: "<timestamp>")
    overrides = [first_of_sweep(o) for o in invocation.overrides]
    try:
        with initialize_config_dir(config_dir=str(primary_dir(invocation)), version_base=None):
            cfg = hydra_compose(invocation.recipe, overrides=[*overrides, searchpath(invocation)])
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise PtmError(f"The command line could not be composed: {str(err).splitlines()[0]}") from None


def checked(invocation: Invocation):
    """(composed config, its typed form) after every schema check."""
    plain = compose(invocation)
    return plain, (check_pretrain if invocation.command == "pretrain" else check_finetune)(plain)
