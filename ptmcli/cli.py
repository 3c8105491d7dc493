"""`ptm COMMAND [conf=RECIPE] [overrides...]`: picks the recipe, checks overrides, then hands over to Hydra.

A recipe (recipes/NAME.yaml) is the primary Hydra config: it pulls in the command's base config from
conf/ and overrides a few groups and keys. Hydra's own flags (-m, --cfg, hydra.run.dir=...,
--shell-completion) keep working. Nothing heavy is imported until a run actually starts.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from ptmcli.errors import PtmError
from ptmcli.schema import MODEL_SCHEMAS, SECTIONS, PretrainConfig, did_you_mean, schema_for_key

# command -> (base config in conf/, default recipe)
COMMANDS = {"pretrain": ("pretrain", "demo")}
# Hydra flags whose next argument is their value, not an override (--info takes one only from its choices).
HYDRA_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path",
                          "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun"}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
GROUPS = ("model", "objective", "data", "optimizer", "hardware")


def config_dirs() -> tuple[Path, Path]:
    """(conf, recipes): inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for root in (here, here.parent):
        if (root / "conf").is_dir() and (root / "recipes").is_dir():
            return root / "conf", root / "recipes"
    raise PtmError(f"Cannot find the conf/ and recipes/ folders next to {here}; reinstall ptm.")


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

    defaults = {name: dataclasses.asdict(schema()) for name, schema in SECTIONS.items()}
    ConfigStore.instance().store(name="ptm_pretrain_defaults", node={**defaults, "resume": None})


def check_override(arg: str) -> None:
    """Fail early, with a did-you-mean, on an override naming an unknown group option or key."""
    if arg.startswith(("-", "hydra.", "hydra/", "+", "~")) or "=" not in arg:
        return
    key, _, value = arg.partition("=")
    if key in GROUPS:
        options = group_options(key)
        for choice in value.split(","):
            if choice not in options:
                raise PtmError(
                    f"'{choice}' is not an option of the '{key}' group.{did_you_mean(choice, options)} "
                    f"Valid options: {', '.join(options)}."
                )
        return
    head, _, rest = key.partition(".")
    top = {f.name for f in dataclasses.fields(PretrainConfig)}
    if head not in top:
        raise PtmError(f"Unknown key '{key}'.{did_you_mean(head, top)} Valid top-level keys: {', '.join(sorted(top))}.")
    if head == "model":
        fields = {f.name for schema in MODEL_SCHEMAS.values() for f in dataclasses.fields(schema)}
        if rest not in fields:
            raise PtmError(f"Unknown key '{key}'.{did_you_mean(rest, fields)} Valid keys of 'model': {', '.join(sorted(fields))}.")
        return
    schema, name = schema_for_key(key)
    if schema is not None:
        fields = [f.name for f in dataclasses.fields(schema)]
        if name not in fields:
            raise PtmError(f"Unknown key '{key}'.{did_you_mean(name, fields)} Valid keys of '{head}': {', '.join(fields)}.")


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, Hydra flags with their values), wherever on the line the flags were."""
    overrides, flags = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            flags.append(arg)
            takes_value = arg in HYDRA_FLAGS_WITH_VALUE or (arg in ("-i", "--info") and i + 1 < len(args)
                                                            and args[i + 1] in INFO_CHOICES)
            if takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        i += 1
    return overrides, flags


def print_help(command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]ptm {command}[/] [conf=RECIPE] [group=option ...] [key=value ...] [-m] [--cfg job]\n")
    table = Table("recipe (conf=)", "what it is", box=None)
    for name, line in recipes().items():
        table.add_row(name, line)
    console.print(table)
    table = Table("group", "options", box=None)
    for group in GROUPS:
        table.add_row(group, ", ".join(group_options(group)))
    console.print(table)
    for section, schema in {"model (bert)": MODEL_SCHEMAS["bert"], **SECTIONS}.items():
        table = Table(f"{section.split()[0]}.KEY", "default", "meaning", box=None)
        for f in dataclasses.fields(schema):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            table.add_row(f"{section.split()[0]}.{f.name}", repr(default), f.metadata.get("help", ""))
        console.print(table)
    console.print(
        "resume=auto|PATH  continue the newest run with this config, or a given run directory / checkpoint\n"
        "Hydra flags: -m (sweep: optimizer.lr=1e-4,5e-4), --cfg job, hydra.run.dir=DIR, --shell-completion install=bash\n"
        "Example: ptm pretrain conf=bert-tiny trainer.max_steps=200 optimizer.lr=5e-4 data.max_train_samples=2000"
    )


def _stamp(*_: object) -> str:
    """Timestamp of this run, shared by all processes of a torchrun job."""
    if "PTM_RUN_STAMP" not in os.environ:
        os.environ["PTM_RUN_STAMP"] = time.strftime("%Y-%m-%d_%H-%M-%S")
    return os.environ["PTM_RUN_STAMP"]


def _share_stamp() -> list[str]:
    """Under torchrun, agree on one run directory; only rank 0 lets Hydra write its files."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    from ptmcli.distributed import broadcast_str, init_from_env

    init_from_env()
    os.environ["PTM_RUN_STAMP"] = broadcast_str(_stamp())
    return [] if os.environ.get("RANK", "0") == "0" else ["hydra.output_subdir=null"]


def run_command(command: str, args: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    recipe = COMMANDS[command][1]
    rest = []
    for arg in args:
        if arg.startswith("conf="):
            recipe = arg.partition("=")[2]
        else:
            rest.append(arg)
    known = recipes()
    if recipe not in known:
        raise PtmError(f"conf={recipe}: no such recipe.{did_you_mean(recipe, known)} Recipes: {', '.join(known)}.")
    overrides, flags = split_flags(rest)
    if not {"-sc", "--shell-completion"} & set(flags):  # there, install=bash / query=bash are not overrides
        for arg in overrides:
            check_override(arg)
    conf_dir, recipe_dir = config_dirs()
    register_defaults()
    if not OmegaConf.has_resolver("ptm_stamp"):
        OmegaConf.register_new_resolver("ptm_stamp", _stamp)

    @hydra.main(version_base=None, config_path=str(recipe_dir), config_name=recipe)
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        try:
            plain = OmegaConf.to_container(cfg, resolve=True)
            from ptmcli.pretrain import pretrain

            pretrain(plain, Path(hydra_cfg.runtime.output_dir), hydra_cfg.job.config_name)
        except PtmError as err:
            fail(err)

    # argparse takes the overrides only as one block, so they go first and Hydra's flags after them.
    sys.argv = ["ptm", *overrides, f"hydra.searchpath=[file://{conf_dir}]", *_share_stamp(), *flags]
    task()


def fail(err: PtmError) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
    sys.exit(err.exit_code)


def _completion(argv: list[str]) -> list[str] | None:
    """Hydra's completion script calls `ptm -sc query=bash` with COMP_LINE='ptm pretrain ...'."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) >= 2 and words[1] in COMMANDS:
        # Hydra reads the overrides from the line itself, so the search path for conf/ goes there too.
        searchpath = f"hydra.searchpath=[file://{config_dirs()[0]}]"
        os.environ["COMP_LINE"] = " ".join([words[0], searchpath, *words[2:]]) + (" " if line.endswith(" ") else "")
        return [words[1], *argv]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-sc", "--shell-completion") and "query=bash" in argv:
        argv = _completion(argv) or argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ptm COMMAND [conf=RECIPE] [overrides...]\n\ncommands:\n"
              "  pretrain   self-supervised pretraining (ptm pretrain --help)")
        return
    command, args = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise PtmError(f"Unknown command '{command}'.{did_you_mean(command, COMMANDS)} Commands: {', '.join(COMMANDS)}.")
        if "--help" in args or "-h" in args:
            print_help(command)
            return
        run_command(command, args)
    except PtmError as err:
        fail(err)
