"""`ptm COMMAND [conf=RECIPE] [overrides...]`: picks the recipe, checks overrides, then hands over to Hydra.

A recipe (recipes/NAME.yaml) is the primary Hydra config: it pulls in the command's base config from
conf/ and overrides a few groups and keys. Hydra's own flags (-m, --cfg, hydra.run.dir=...,
--shell-completion) keep working. Nothing heavy is imported until a run actually starts.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from ptmcli.compose import (
    COMMANDS,
    parse,
    primary_dir,
    register_defaults,
    searchpath,
)
from ptmcli.confdirs import config_dirs
from ptmcli.errors import Interrupted, PtmError
from ptmcli.files import os_error, read_text
from ptmcli.finetune_checks import check_finetune
from ptmcli.loggers import check as check_loggers
from ptmcli.malloc import restart_tuned
from ptmcli.preflight import check_paths
from ptmcli.schema import (
    check_pretrain,
)
from ptmcli.typecheck import did_you_mean

# The run directory and those of its parents that did not exist before Hydra made them (deepest first): a run
# that fails at start removes them again while they are empty.
NEW_DIRS: list[Path] = []


# Commands that read a finished run instead of composing a config.
RUN_COMMANDS = {
    "evaluate": "metrics of a fine-tuned run on a split: ptm evaluate run=DIR split=test; or sentence-vector "
    "retrieval of any encoder (ptm run, checkpoint or Hugging Face directory): ptm evaluate task=headline-retrieval "
    "run=PATH [pooling=mean|cls]",
    "embed": "normalised sentence vectors of any encoder: ptm embed run=PATH input=texts.txt output=vectors.npy|.jsonl "
    "[pooling=mean|cls] [batch_size=64] [max_seq_len=128]",
    "predict": "predictions, one JSON line per input: ptm predict run=DIR input=texts.txt [output=FILE]",
    "export": "a run for transformers or PEFT: ptm export run=DIR [format=hf|peft] [output=DIR] [merge=true] "
    "[checkpoint=NAME]; format=hf (the default, but for adapter runs) writes a directory from_pretrained loads, "
    "format=peft an adapter, merge=true LoRA folded into the base as format=hf",
    "generate": "continue text with a causal LM run, or write outputs with a text-to-text run: ptm generate "
    "run=DIR prompt=TEXT | input=FILE (one per line) [max_new_tokens=40 top_p=1 top_k=0 temperature=1 "
    "greedy=false seed=0 cache=true num_beams=1 length_penalty=1 no_repeat_ngram_size=0]; a text-to-text run "
    "decodes as its validation did (the task's beams, n-gram blocking and target length) unless told otherwise",
}
# Commands that look at configs without training.
CONFIG_TOOLS = {
    "ls": "recipes, tasks and every config group's options, each with its description: ptm ls",
    "cat": "a composed, checked config as YAML with each key's help: ptm cat conf=RECIPE | task=NAME [key=value ...]",
    "validate": "every check a run makes before training (config, data, labels, tokenizer, init, resume), without "
    "training: ptm validate conf=RECIPE | task=NAME [key=value ...]",
    "prepare": "tokenize and pack a pretraining corpus once into a token directory that runs train from with "
    "data.tokens=DIR: ptm prepare conf=RECIPE [data overrides] output=DIR",
    "plot": "a PNG of a metric of one or more runs: ptm plot run=DIR [run=DIR ...] metric=val/loss [output=FILE]",
    "runs": "the runs under folders, one row each: ptm runs [PATH ...] [--sort KEY] [--where key=value] [--json]; "
    "ptm runs compare RUN_A RUN_B [...] shows the config keys that differ and the metrics side by side",
}
# ptm generate's arguments -> their types (defaults: generation.Sampling's, or a text-to-text run's task)
GENERATE_ARGS = {
    "max_new_tokens": int,
    "greedy": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "cache": bool,
    "num_beams": int,
    "length_penalty": float,
    "no_repeat_ngram_size": int,
}


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
    return []


class NewRunDirs:
    """A Hydra callback that run_command adds (users cannot: hydra.callbacks overrides are refused): before Hydra
    creates the run directory, note which directories on its path do not exist yet; after a sweep, summarise it."""

    def on_run_start(self, config, **_) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        HydraConfig.instance().set_config(config)  # the directory's ${hydra:...} parts resolve through it
        path = Path(OmegaConf.select(config, "hydra.run.dir")).absolute()
        NEW_DIRS[:] = [p for p in [path, *path.parents] if not p.exists()]

    def on_multirun_end(self, config, **_) -> None:
        """A sweep ends with a table of its jobs, best first, and sweep.json beside them."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from ptmcli import runs

        HydraConfig.instance().set_config(config)
        runs.sweep_summary(Path(OmegaConf.select(config, "hydra.sweep.dir")))

    def __getattr__(self, name: str):  # Hydra calls every on_* hook of a callback; the others do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def remove_new_empty_dirs() -> None:
    """Undo the directories Hydra made for a run that then wrote nothing into them."""
    for path in NEW_DIRS:
        try:
            path.rmdir()  # only an empty directory goes
        except OSError:
            return
    NEW_DIRS.clear()


def run_command(name: str, args: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ptmcli.configtools import check_sweep

    invocation = parse(name, args)
    check_sweep(invocation)
    register_defaults()
    if not OmegaConf.has_resolver("ptm_stamp"):
        OmegaConf.register_new_resolver("ptm_stamp", _stamp)

    @hydra.main(version_base=None, config_path=str(primary_dir(invocation)), config_name=invocation.recipe)
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        ended = "failed"  # unless the run gets to its end or is interrupted
        try:
            try:
                plain = OmegaConf.to_container(cfg, resolve=True)
            except OmegaConfBaseException as err:
                raise PtmError(f"The config could not be resolved: {err}") from err
            typed = (check_pretrain if name == "pretrain" else check_finetune)(plain)
            check_paths(typed)  # before torch loads
            check_loggers(typed.trainer.loggers)
            if name == "pretrain":
                from ptmcli.pretrain import pretrain as entry
            else:
                from ptmcli.finetune import finetune as entry
            # Hydra was told not to write its .hydra/ record (it would, even for a run refused at start); the run
            # writes it once every check has passed.
            hydra_files = {
                "config.yaml": OmegaConf.to_yaml(cfg),
                "overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
            }
            named = any(o.partition("=")[0].lstrip("+") == "hydra.run.dir" for o in hydra_cfg.overrides.hydra)
            entry(plain, run_dir, hydra_cfg.job.config_name, named_dir=named, hydra_files=hydra_files)
            ended = "completed"
        except PtmError as err:
            ended = "interrupted" if isinstance(err, Interrupted) else "failed"
            fail(err)
        except OSError as err:
            fail(os_error(err))
        except KeyboardInterrupt:
            ended = "interrupted"
            raise
        finally:
            release_run(ended)

    # argparse takes the overrides only as one block, so they go first and Hydra's flags after them.
    sys.argv = [
        "ptm",
        *invocation.overrides,
        searchpath(invocation),
        "hydra.output_subdir=null",
        f"+hydra.callbacks.ptm_new_run_dirs._target_={NewRunDirs.__module__}.{NewRunDirs.__qualname__}",
        *_share_stamp(),
        *invocation.flags,
    ]
    task()


def release_run(ended: str = "failed") -> None:
    """Record how the run ended, give up the run directory's lock, and remove it again if the run made nothing
    in it."""
    rundir = sys.modules.get("ptmcli.rundir")  # imported only once a run got that far
    if rundir is not None:
        rundir.mark_ended(ended)
        rundir.release()
    remove_new_empty_dirs()


def parse_run_args(name: str, args: list[str]) -> dict[str, str]:
    """The key=value arguments of a run command (evaluate, predict, export, generate), checked by name."""
    if name not in RUN_COMMANDS:
        known = [*COMMANDS, *RUN_COMMANDS, *CONFIG_TOOLS]
        raise PtmError(f"Unknown command '{name}'.{did_you_mean(name, known)} Commands: {', '.join(known)}.")
    allowed = {
        "evaluate": ("run", "split", "checkpoint", "task", "init", "pooling", "batch_size"),
        "embed": ("run", "input", "output", "pooling", "batch_size", "max_seq_len"),
        "predict": ("run", "input", "output", "checkpoint", "task"),
        "export": ("run", "format", "merge", "output", "checkpoint"),
        "generate": ("run", "prompt", "input", "output", "checkpoint", *GENERATE_ARGS),
    }[name]
    values = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise PtmError(
                f"ptm {name}: unexpected argument '{arg}'.{did_you_mean(key, allowed)} "
                f"Arguments: {', '.join(k + '=...' for k in allowed)}."
            )
        values[key] = value
    if name == "evaluate" and retrieval(values):
        return values
    if "run" not in values:
        if name == "embed":
            raise PtmError("ptm embed needs run=PATH: a ptm run or checkpoint, or a Hugging Face model directory.")
        kind = {"generate": "causal-LM pretraining", "export": "pretraining or fine-tuning"}.get(name, "fine-tuning")
        raise PtmError(f"ptm {name} needs run=DIR, a {kind} run directory.")
    return values


def retrieval(values: dict[str, str]) -> bool:
    """`ptm evaluate task=...` of a retrieval task (any encoder, named by run= or init=), rather than one task of a
    multi-task run."""
    if "task" not in values:
        return False
    run = Path(values.get("run", ""))
    if "run" in values and (run / "config.yaml").is_file():
        from ptmcli import runfiles

        return runfiles.config(run).get("tasks") is None
    return True


def run_run_command(name: str, args: list[str]) -> None:
    """`ptm evaluate` / `predict` / `export` / `generate`: key=value arguments, no config composition."""
    values = parse_run_args(name, args)
    if name == "generate":
        run_generate(values)
        return
    if name == "embed":
        from ptmcli.embed import embed_command

        embed_command(values)
        return
    if name == "evaluate" and retrieval(values):
        from ptmcli.retrieval import evaluate_retrieval

        evaluate_retrieval(values)
        return
    from ptmcli import inference

    if name == "export":
        from ptmcli.export import export_run

        merge = values.get("merge", "false").lower()
        if merge not in ("true", "false"):
            raise PtmError(f"merge={values['merge']!r}: use merge=true or merge=false.")
        output = Path(values["output"]) if "output" in values else None
        export_run(Path(values["run"]), values.get("format"), merge == "true", output, values.get("checkpoint"))
    elif name == "evaluate":
        from ptmcli.embed import positive_int

        given = [k for k in ("init", "pooling") if k in values]
        if given:
            raise PtmError(
                f"ptm evaluate run=DIR: {'= and '.join(given)}= {'apply' if len(given) > 1 else 'applies'} to a "
                f"retrieval task (task=headline-retrieval); "
                f"a fine-tuning run is evaluated with its own model and settings. Drop {' and '.join(given)}=."
            )
        batch_size = positive_int(values, "batch_size", 0) if "batch_size" in values else None
        inference.evaluate_run(
            Path(values["run"]), values.get("split", "test"), values.get("checkpoint"), values.get("task"), batch_size
        )
    else:
        if "input" not in values:
            raise PtmError("ptm predict needs input=FILE (one text per line, or JSON lines).")
        inference.predict_run(
            Path(values["run"]),
            Path(values["input"]),
            values.get("output"),
            values.get("checkpoint"),
            values.get("task"),
        )


def _typed(key: str, value: str, kind: type):
    try:
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        return kind(value)
    except ValueError:
        raise PtmError(f"{key}={value!r} is not a valid {kind.__name__}.") from None


def run_generate(values: dict[str, str]) -> None:
    from ptmcli.generate import generate_run

    settings = {k: _typed(k, values[k], kind) for k, kind in GENERATE_ARGS.items() if k in values}
    if "cache" in settings:
        settings["use_cache"] = settings.pop("cache")
    if ("prompt" in values) == ("input" in values):
        raise PtmError("ptm generate needs either prompt=TEXT or input=FILE (one prompt per line).")
    if "input" in values:
        prompts = [line for line in read_text(Path(values["input"]), "input").splitlines() if line.strip()]
        if not prompts:
            raise PtmError(f"input='{values['input']}' is empty; give a text file with one prompt per line.")
    else:
        prompts = [values["prompt"]]
    generate_run(Path(values["run"]), prompts, settings, values.get("output"), values.get("checkpoint"))


def fail(err: PtmError) -> None:
    from rich.console import Console
    from rich.markup import escape

    # soft wrap: the terminal wraps, so paths and keys in the message stay whole for copying (and for grep)
    label = "[bold yellow]interrupted:[/]" if isinstance(err, Interrupted) else "[bold red]error:[/]"
    # escaped: a message quotes the user's input, whose [brackets] are not rich markup
    Console(stderr=True, soft_wrap=True).print(f"{label} {escape(str(err))}", highlight=False)
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


def loaded(name: str):
    """Module `name` if this process imported it, else None -- never imported here. Ctrl-C while torch is being
    imported leaves its compiled parts registered, and importing it again then crashes the interpreter (a segfault,
    not a message); a module whose import was interrupted is not in sys.modules."""
    return sys.modules.get(name)


STOPPED_BY = [signal.SIGINT]  # the signal that stopped a command before training began (its exit status)


def stop_on_sigterm() -> None:
    """SIGTERM before training begins stops the command as Ctrl-C does -- the directories Hydra made for the run
    removed, one line, status 143 -- instead of killing it on the spot. Training installs its own handler
    (loop.stop_requests: a checkpoint at the next step boundary) and puts this one back when it ends. A torchrun
    worker keeps the default: torchrun ends the workers of a failed job with SIGTERM, and one that stopped to leave
    its process group could wait on peers that are gone."""

    def stop(signum, _frame):
        STOPPED_BY[0] = signum
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        signal.signal(signal.SIGTERM, stop)


def run() -> None:
    """The `ptm` command and `python -m ptmcli`: `main`, then its exit status -- in a torchrun worker without the
    interpreter's teardown (see `distributed.end_worker`). A command that runs a model starts again at once with
    glibc's malloc set up for training (`malloc.restart_tuned`), before torch is imported."""
    if len(sys.argv) > 1 and (sys.argv[1] in COMMANDS or sys.argv[1] in RUN_COMMANDS):
        restart_tuned()
        stop_on_sigterm()
    try:
        main()
    except SystemExit as stop:
        status = stop.code
    except BaseException:  # a bug: its traceback, as the interpreter prints it, and status 1
        traceback.print_exc()
        status = 1
    else:
        status = 0
    distributed = loaded("ptmcli.distributed")  # never import torch for a command that did not
    if distributed is not None:
        distributed.end_worker(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-sc", "--shell-completion") and "query=bash" in argv:
        argv = _completion(argv) or argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {n:<10} {c.summary} (ptm {n} --help)" for n, c in COMMANDS.items()]
        lines += [f"  {n:<10} {text}" for n, text in {**RUN_COMMANDS, **CONFIG_TOOLS}.items()]
        print("usage: ptm COMMAND [conf=RECIPE] [overrides...]\n\ncommands:\n" + "\n".join(lines))
        print("  --version  the installed ptm's version")
        return
    if argv[0] in ("--version", "-V"):
        from importlib.metadata import version

        print(f"ptm {version('ptmcli')}")
        return
    name, args = argv[0], argv[1:]
    try:
        if name in CONFIG_TOOLS:
            if "--help" in args or "-h" in args:
                print(f"ptm {name}: {CONFIG_TOOLS[name]}")
                return
            from ptmcli import configtools

            if name == "prepare":
                from ptmcli.prepare import prepare

                prepare(args)
                return
            if name in ("runs", "plot"):
                from ptmcli import plots, runs

                (runs.main if name == "runs" else plots.plot)(args)
                return
            {"ls": lambda _: configtools.list_configs(), "cat": configtools.cat, "validate": configtools.validate}[
                name
            ](args)
            return
        if name in RUN_COMMANDS:
            if "--help" in args or "-h" in args:
                print(f"ptm {name}: {RUN_COMMANDS[name]}")
                return
            run_run_command(name, args)
            return
        if name not in COMMANDS:
            known = [*COMMANDS, *RUN_COMMANDS, *CONFIG_TOOLS]
            raise PtmError(f"Unknown command '{name}'.{did_you_mean(name, known)} Commands: {', '.join(known)}.")
        if "--help" in args or "-h" in args:
            from ptmcli.configtools import print_help

            print_help(name)
            return
        run_command(name, args)
    except PtmError as err:
        fail(err)
    except OSError as err:  # a file ptm reads or writes for a run command, not caught closer to its use
        fail(os_error(err))
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C: stop at once, without a traceback
        fail(Interrupted("stopped at once; the run's last checkpoint (if any) is intact.", STOPPED_BY[0]))
    finally:
        distributed = loaded("ptmcli.distributed")  # never import torch just to find there is nothing to close
        if distributed is not None:
            distributed.close()
