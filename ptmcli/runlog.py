"""What a run tells the user: `metrics.jsonl` rows and a rich progress bar (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after step `last_step` (by a process killed after its last checkpoint), atomically."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


class RunLog:
    """Appends one JSON object per event to metrics.jsonl and drives the progress bar."""

    def __init__(self, path: Path | None, total_steps: int, start_step: int):
        self.path = path
        self.progress = None
        if path is not None:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            f.flush()

    def train(self, row: dict) -> None:
        self.write(row)
        if self.progress is not None:
            status = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
            self.progress.update(self.task, completed=row["step"], status=status)

    def val(self, row: dict) -> None:
        self.write(row)
        if self.progress is not None:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "split") and isinstance(v, float))
            self.progress.console.print(f"step {row['step']:>6}  [cyan]val[/]  {shown}")

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
