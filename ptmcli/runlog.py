"""What a run tells the user: `metrics.jsonl` rows and a rich progress bar (rank 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ptmcli.files import write_whole

console = Console(stderr=True, highlight=False)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after step `last_step` (by a process killed after its last checkpoint), atomically.
    A line cut short by the kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_whole(path, "".join(line + "\n" for line in kept), "run")


def tail_rows(path: Path, size: int = 1 << 16) -> list[dict]:
    """The rows in the last `size` bytes of a JSON-lines file (a first, cut line is dropped)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            lines = f.read().split(b"\n")
    except OSError:
        return []
    if end > size:
        lines = lines[1:]
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a partial last line of a run being written, or an empty one
            continue
    return rows


def preparing(text: str, show: bool = True):
    """A spinner with `text` while a long preparation step runs (rank 0; nothing when output is not a terminal)."""
    return console.status(f"[bold]{text}[/]…", spinner="dots") if show else contextlib.nullcontext()


@contextlib.contextmanager
def counted(text: str, show: bool = True):
    """For steps that `datasets` and `tokenizers` run: their own bars count examples (across `num_proc` workers)
    and merges, so they are switched on for the step instead of a spinner, under a line saying what it is.
    Rank 0 on a terminal only. Yields whether bars are shown (for `show_progress=` of a tokenizer trainer)."""
    import datasets

    if not (show and console.is_terminal):
        yield False
        return
    console.print(f"[bold]{text}[/]")
    was_on = datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    try:
        yield True
    finally:
        if not was_on:
            datasets.disable_progress_bars()


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


class RunLog:
    """Appends one JSON object per event to metrics.jsonl and drives the progress bar."""

    def __init__(self, path: Path | None, total_steps: int, start_step: int, sinks=None):
        self.path = path
        self.sinks = sinks  # loggers.Sinks: TensorBoard, MLflow, W&B (rank 0 only)
        self.progress = None
        if path is not None:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            f.flush()
        if self.sinks is not None:
            self.sinks.row(row)

    def train(self, row: dict) -> None:
        self.write(row)
        if self.progress is not None:
            status = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
            if row.get("mfu") is not None:
                status += f"  MFU {row['mfu']:.1%}"
            self.progress.update(self.task, completed=row["step"], status=status)

    def val(self, row: dict) -> None:
        self.write(row)
        if self.progress is not None:
            # per-class scores stay in metrics.jsonl; the terminal line keeps the headline figures
            shown = "  ".join(
                f"{k} {v:.4f}"
                for k, v in row.items()
                if isinstance(v, float) and not k.rpartition("/")[2].startswith(("precision_", "recall_", "f1_"))
            )
            self.progress.console.print(f"step {row['step']:>6}  [cyan]val[/]  {shown}")

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)

    def saving(self, step: int | None, megabytes: float = 0.0) -> None:
        """Say on the progress bar that checkpoint step-N (of about `megabytes`) is being written (None: done)."""
        if self.progress is not None:
            status = f"writing checkpoint step-{step} ({megabytes:,.0f} MB)…" if step is not None else ""
            self.progress.update(self.task, status=status)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def print_metrics(title: str, metrics: dict, labels: list[str]) -> None:
    """Scalar metrics as a table, and the confusion matrix (rows gold, columns predicted) when there is one."""
    table = Table("metric", "value", title=title, box=None)
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    console.print(table)
    if "confusion_matrix" in metrics:
        matrix = Table("gold \\ predicted", *labels, title="confusion matrix", box=None)
        for name, row in zip(labels, metrics["confusion_matrix"]):
            matrix.add_row(name, *(str(v) for v in row))
        console.print(matrix)
