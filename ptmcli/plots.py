"""Pictures of runs: `curves.png` at the end of every run, and `ptm plot` of any metric of one or more runs.

matplotlib (Agg backend, no display needed) is an optional extra: without it a run skips its curves.png with a
note, and `ptm plot` says what to install.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ptmcli.errors import PtmError
from ptmcli.files import replaced_whole

INSTALL = "pip install matplotlib (or pip install 'ptmcli[plots]')"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_rows(run_dir: Path) -> list[dict]:
    rows = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError as err:
        raise PtmError(f"run='{run_dir}' has no readable metrics.jsonl ({err.strerror}); is it a run directory?")
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(rows: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r[key])
        for r in rows
        if r.get("split") == split and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    ]
    return [s for s, _ in points], [v for _, v in points]


def save(fig, out: Path, key: str) -> None:
    """The figure in the format its file name says (png, pdf, svg, ...), written whole or not at all."""
    kind = out.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    try:
        if kind not in supported:
            raise PtmError(f"{key}='{out}': matplotlib writes {', '.join(sorted(supported))}, not .{kind}.")
        with replaced_whole(out, key, "wb") as handle:
            fig.savefig(handle, format=kind)
    finally:
        _pyplot().close(fig)


def _draw(ax, steps: list[int], values: list[float], **style) -> None:
    """A line; a lone point (a run with a single train row) as a dot, which a line would not show."""
    if len(steps) == 1:
        style.setdefault("marker", "o")
    ax.plot(steps, values, **style)


def write_curves(run_dir: Path, metric: str = "val/loss") -> Path | None:
    """curves.png: training loss (and each term's), validation loss and `metric`, learning rate; x in steps."""
    rows = read_rows(run_dir)
    if not any(r.get("split") == "train" for r in rows):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    loss_ax, val_ax, lr_ax = axes
    _draw(loss_ax, *series(rows, "train", "loss"), label="loss", linewidth=2)
    logged = dict.fromkeys(k for r in rows if r.get("split") == "train" for k in r)
    terms = [k for k in logged if k.endswith("_loss")]
    if len(terms) > 1:  # one line per term when the objective has several (MLM + NSP, generator + detector)
        for key in terms:
            _draw(loss_ax, *series(rows, "train", key), label=key, linewidth=1, alpha=0.7)
    loss_ax.set(title="training loss", xlabel="step")
    loss_ax.legend(fontsize="small")
    name = metric.removeprefix("val/")
    for key in dict.fromkeys(["loss", name]):
        steps, values = series(rows, "val", key)
        if steps:
            val_ax.plot(steps, values, marker="o", label=f"val/{key}")
    val_ax.set(title="validation", xlabel="step")
    if val_ax.get_legend_handles_labels()[0]:
        val_ax.legend(fontsize="small")
    _draw(lr_ax, *series(rows, "train", "lr"))
    lr_ax.set(title="learning rate", xlabel="step")
    fig.suptitle(str(run_dir), fontsize="small")
    fig.tight_layout()
    out = run_dir / "curves.png"
    save(fig, out, "curves")
    return out


def plot(args: list[str]) -> None:
    """ptm plot run=DIR [run=DIR ...] metric=SPLIT/NAME [output=FILE]: one line per run."""
    runs, metric, output = [], None, None
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("run", "metric", "output"):
            raise PtmError(
                f"ptm plot: '{arg}' is not one of run=DIR (one or more), metric=SPLIT/NAME, output=FILE; "
                "e.g. ptm plot run=runs/pretrain/demo/<ts> metric=val/loss."
            )
        if key == "run":
            runs.append(Path(value))
        elif key == "metric":
            metric = value
        else:
            output = Path(value)
    if not runs or not metric:
        raise PtmError("ptm plot needs run=DIR (one or more) and metric=SPLIT/NAME, e.g. metric=val/loss.")
    split, sep, name = metric.partition("/")
    if not sep or split not in ("train", "val"):
        raise PtmError(f"metric='{metric}': give SPLIT/NAME with SPLIT train or val, e.g. val/accuracy, train/loss.")
    if not available():
        raise PtmError(f"ptm plot draws with matplotlib, which is not installed: {INSTALL}.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for run in runs:
        rows = read_rows(run)
        steps, values = series(rows, split, name)
        if not steps:
            known = sorted({k for r in rows if r.get("split") == split for k in r} - {"step", "split"})
            raise PtmError(f"run='{run}' logged no {metric}; its {split} metrics are: {', '.join(known) or 'none'}.")
        _draw(ax, steps, values, label=str(run), **({"marker": "o"} if split == "val" else {}))
    ax.set(xlabel="step", ylabel=metric, title=metric)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = output or (runs[0] / f"plot-{split}_{name}.png" if len(runs) == 1 else Path(f"plot-{split}_{name}.png"))
    save(fig, out, "output")
    print(out)
