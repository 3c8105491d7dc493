"""`ptm runs`: the run directories under some folders, one row each, and `ptm runs compare` of a few of them.

A row is read from small files only, so that hundreds of runs list at once: run.json (command, recipe, start,
how the run ended), config.yaml, the newest checkpoint's trainer_state.json (step, planned steps, best
validation value) and the last lines of metrics.jsonl. Whether a run is still going is asked of the kernel: a
live run holds the flock on RUN/.lock, which dies with its process, so a killed run is told from a running one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ptmcli.errors import PtmError
from ptmcli.files import write_whole
from ptmcli.loggers import flatten
from ptmcli.runlog import tail_rows
from ptmcli.typecheck import did_you_mean

COLUMNS = ("command", "name", "model", "started", "steps", "status", "best", "loss", "tokens/s", "path")


@dataclass
class Run:
    path: str
    command: str
    name: str
    model: str
    started: str
    step: int | None
    max_steps: int | None
    status: str  # running, finished, stopped early, interrupted, failed, killed
    metric: str  # trainer.metric, e.g. val/accuracy
    best: float | None
    loss: float | None  # the last logged training loss
    tokens_per_s: float | None
    final: dict = field(default_factory=dict)  # the last validation row's metrics, as val/NAME
    config: dict = field(default_factory=dict)  # flattened: key.subkey -> value


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run directory (one with a run.json) at or under `paths`, checkpoints and Hydra records skipped."""
    found: dict[Path, None] = {}
    for root in paths:
        if not root.exists():
            raise PtmError(f"'{root}' does not exist; give folders that hold runs (default ./runs).")
        if (root / "run.json").is_file():
            found[root] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", ".hydra"))
            if "run.json" in filenames:
                found[Path(dirpath)] = None
    return list(found)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def newest_state(run_dir: Path) -> dict:
    """trainer_state.json of the highest-numbered complete checkpoint (read, not verified: this only lists)."""
    steps = []
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        if (ckpt / "COMPLETE").exists() and ckpt.name[5:].isdigit():
            steps.append((int(ckpt.name[5:]), ckpt))
    return _json(max(steps)[1] / "trainer_state.json") if steps else {}


def status_of(run_dir: Path, info: dict, state: dict) -> str:
    from ptmcli.rundir import lock_holder

    if lock_holder(run_dir) is not None:
        return "running"
    ended = info.get("ended", {}).get("status")
    if ended in ("interrupted", "failed"):
        return ended
    done = state.get("step") is not None and state.get("step") == state.get("max_steps")
    if ended == "completed" or done:
        return "finished" if done else "stopped early"
    return "killed"  # no end was recorded and nothing holds the lock: the process died


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def summarize(run_dir: Path) -> Run:
    info = _json(run_dir / "run.json")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    state = newest_state(run_dir)
    rows = tail_rows(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    command = info.get("command", "?")
    model_cfg = config.get("model") or {}
    if command == "finetune":
        name = (config.get("data") or {}).get("name") or info.get("recipe", "?")
        model = str(config.get("init") or model_cfg.get("family") or "?")
    else:
        name = info.get("recipe", "?")
        model = str(model_cfg.get("family", "?"))
    trainer = config.get("trainer") or {}
    metric = trainer.get("metric", "val/loss")
    best = (state.get("best") or {}).get("value")
    step = max([r.get("step", 0) for r in rows] + [state.get("step") or 0]) or None
    try:
        shown_path = str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown_path = str(run_dir)
    return Run(
        path=shown_path,
        command=command,
        name=name,
        model=_short(model.removeprefix("pkg://")),
        started=info.get("created", "?"),
        step=step,
        max_steps=state.get("max_steps") or trainer.get("max_steps"),
        status=status_of(run_dir, info, state),
        metric=metric,
        best=best if best is not None else (val[-1].get(metric.removeprefix("val/")) if val else None),
        loss=train[-1].get("loss") if train else None,
        tokens_per_s=train[-1].get("tokens_per_s") if train else None,
        final={f"val/{k}": v for k, v in val[-1].items() if k not in ("step", "split")} if val else {},
        config=flatten(config),
    )


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def cell(run: Run, column: str) -> str:
    if column == "steps":
        return f"{run.step or 0}/{run.max_steps or '?'}"
    if column == "best":
        return f"{run.metric} {_number(run.best)}" if run.best is not None else "-"
    if column == "loss":
        return _number(run.loss)
    if column == "tokens/s":
        return _number(run.tokens_per_s)
    return str(getattr(run, column))


def sort_value(run: Run, key: str):
    """A column, a validation metric (val/NAME: the best if it is trainer.metric, else the last logged) or a
    config key."""
    if key == run.metric and run.best is not None:
        return run.best
    if key.startswith("val/"):
        return run.final.get(key)
    if key in ("steps", "step"):
        return run.step
    if key == "tokens/s":
        return run.tokens_per_s
    if key in COLUMNS:
        return getattr(run, key, None)
    return run.config.get(key)


def _descending(key: str, runs: list[Run]) -> bool:
    """Higher first for accuracy-like metrics and throughput, lower first for losses and everything else."""
    mode = {r.config.get("trainer.metric"): r.config.get("trainer.metric_mode") for r in runs}.get(key)
    if mode:
        return mode == "max"
    return key in ("tokens/s", "started") or any(w in key for w in ("accuracy", "f1", "rouge", "exact", "mrr"))


def order(runs: list[Run], key: str) -> list[Run]:
    values = [(sort_value(r, key), r) for r in runs]
    present = [(v, r) for v, r in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    missing = [r for v, r in values if v is None or (isinstance(v, float) and math.isnan(v))]
    try:
        present.sort(key=lambda vr: vr[0], reverse=_descending(key, runs))
    except TypeError:  # mixed types under one config key
        present.sort(key=lambda vr: str(vr[0]), reverse=_descending(key, runs))
    return [r for _, r in present] + missing


def _same(value, wanted: str) -> bool:
    if str(value) == wanted or str(value).lower() == wanted.lower():
        return True
    try:
        return float(value) == float(wanted)  # 5e-4 matches the 0.0005 config.yaml holds
    except (TypeError, ValueError):
        return False


def _matches(run: Run, where: list[tuple[str, str]]) -> bool:
    for key, wanted in where:
        value = run.config.get(key, getattr(run, key, None) if key in COLUMNS else None)
        if value is None or not _same(value, wanted):
            return False
    return True


def parse_args(args: list[str]) -> tuple[list[Path], str | None, list[tuple[str, str]], bool]:
    paths, sort, where, as_json = [], None, [], False
    items = iter(args)
    for arg in items:
        if arg == "--json":
            as_json = True
        elif arg in ("--sort", "--where"):
            value = next(items, None)
            if value is None:
                raise PtmError(f"ptm runs {arg} needs a value: --sort KEY, --where key=value.")
            if arg == "--sort":
                sort = value
            else:
                key, sep, wanted = value.partition("=")
                if not sep:
                    raise PtmError(f"ptm runs --where '{value}': give key=value, e.g. --where optimizer.lr=5e-4.")
                where.append((key, wanted))
        elif arg.startswith("-"):
            raise PtmError(f"ptm runs: unknown option '{arg}'; use --sort KEY, --where key=value, --json.")
        else:
            paths.append(Path(arg))
    return paths or [Path("runs")], sort, where, as_json


def table(runs: list[Run], title: str | None = None):
    from rich.table import Table

    shown = Table(title=title, title_justify="left")
    for column in COLUMNS:
        shown.add_column(column, justify="right" if column in ("steps", "best", "loss", "tokens/s") else "left")
    for run in runs:
        shown.add_row(*(cell(run, c) for c in COLUMNS))
    return shown


def _stdout():
    import sys

    from rich.console import Console

    # the listing is the command's output: stdout, unlike the run logs; piped, its rows are never cut to 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 250)


def list_runs(args: list[str]) -> None:
    console = _stdout()
    paths, sort, where, as_json = parse_args(args)
    found = [summarize(p) for p in find_runs(paths)]
    check_keys(found, sort, where)
    runs = [r for r in found if _matches(r, where)]
    runs = order(runs, sort) if sort else sorted(runs, key=lambda r: r.started)
    if as_json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "config"} for r in runs], indent=1))
        return
    if not runs:
        matching = f" match {' '.join('--where ' + k + '=' + v for k, v in where)}" if found else ""
        console.print(
            f"{'none of the ' + str(len(found)) if found else 'no'} runs under {', '.join(map(str, paths))}{matching}"
        )
        return
    console.print(table(runs))


def check_keys(runs: list[Run], sort: str | None, where: list[tuple[str, str]]) -> None:
    """A --sort or --where key that no run has is a typo, not an empty answer: say so, with the closest key."""
    if not runs:
        return
    keys = {k for r in runs for k in r.config} | set(COLUMNS) | {k for r in runs for k in r.final}
    asked = [("--sort", sort)] if sort else []
    for option, key in [*asked, *(("--where", k) for k, _ in where)]:
        if key not in keys and all(sort_value(r, key) is None for r in runs):
            raise PtmError(
                f"ptm runs {option} {key}: none of the {len(runs)} runs has '{key}'.{did_you_mean(key, keys)} Use a "
                f"column ({', '.join(c for c in COLUMNS if c != 'path')}), a validation metric (val/NAME) or a "
                f"config key (optimizer.lr)."
            )


def compare(args: list[str]) -> None:
    """The config keys that differ between the runs, then their final and best metrics side by side."""
    from rich.table import Table

    console = _stdout()
    if len(args) < 2:
        raise PtmError("ptm runs compare needs two or more run directories: ptm runs compare RUN_A RUN_B [RUN_C ...]")
    runs = []
    for arg in args:
        if not (Path(arg) / "run.json").is_file():
            raise PtmError(f"'{arg}' is not a run directory (it has no run.json).")
        runs.append(summarize(Path(arg)))
    names = [f"{chr(ord('A') + i)}" for i in range(len(runs))]
    legend = Table(show_header=False, box=None)
    for name, run in zip(names, runs):
        legend.add_row(name, run.path)
    console.print(legend)
    differ = differing_keys(runs)
    config = Table(title="config keys that differ", title_justify="left")
    config.add_column("key")
    for name in names:
        config.add_column(name)
    for key in differ:
        config.add_row(key, *(_number(r.config.get(key)) if r.config.get(key) is not None else "-" for r in runs))
    console.print(config if differ else "the runs' configs are the same")
    results = Table(title="results", title_justify="left")
    results.add_column("")
    for name in names:
        results.add_column(name, justify="right")
    results.add_row("status", *(r.status for r in runs))
    results.add_row("steps", *(cell(r, "steps") for r in runs))
    for metric in dict.fromkeys(r.metric for r in runs):
        results.add_row(f"best {metric}", *(_number(r.best) if r.metric == metric else "-" for r in runs))
    for key in dict.fromkeys(k for r in runs for k in r.final):
        results.add_row(f"final {key}", *(_number(r.final.get(key)) for r in runs))
    results.add_row("last train loss", *(_number(r.loss) for r in runs))
    results.add_row("tokens/s", *(_number(r.tokens_per_s) for r in runs))
    console.print(results)


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def sweep_summary(sweep_dir: Path) -> list[Run]:
    """At the end of a multirun: its jobs best first by trainer.metric, as a table and as SWEEP/sweep.json."""
    runs = [summarize(p) for p in find_runs([sweep_dir])] if sweep_dir.exists() else []
    if not runs:
        return []
    metric = runs[0].metric
    runs = order(runs, metric)
    varied = differing_keys(runs)
    rows = [
        {
            "path": r.path,
            "status": r.status,
            "step": r.step,
            "max_steps": r.max_steps,
            "metric": r.metric,
            "best": r.best,
            **{k: r.config.get(k) for k in varied},
        }
        for r in runs
    ]
    write_whole(sweep_dir / "sweep.json", json.dumps({"metric": metric, "jobs": rows}, indent=1) + "\n", "sweep")
    from rich.table import Table

    from ptmcli.runlog import console

    shown = Table(title=f"sweep {sweep_dir}, best {metric} first", title_justify="left")
    for column in ("job", *varied, metric, "status", "steps"):
        shown.add_column(column)
    for r in runs:
        shown.add_row(
            Path(r.path).name, *(_number(r.config.get(k)) for k in varied), _number(r.best), r.status, cell(r, "steps")
        )
    console.print(shown)
    console.print(f"written {sweep_dir / 'sweep.json'}")
    return runs


def main(args: list[str]) -> None:
    if args[:1] == ["compare"]:
        compare(args[1:])
    else:
        list_runs(args)
