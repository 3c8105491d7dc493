"""Where a run's metric rows go besides metrics.jsonl (always written): TensorBoard, MLflow, Weights & Biases.

Each is an optional package; asking for one that is not installed fails at start with the pip command. Only
rank 0 logs. A resumed run continues the same TensorBoard directory and the same MLflow / W&B run without
duplicated steps: TensorBoard is told to drop events after the checkpoint's step (`purge_step`, which its
readers honour), and the trackers, whose points cannot be deleted, are sent a row only once a checkpoint
covers it (or the run ends), so a killed process never sent what its successor logs again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import typing
import uuid
from pathlib import Path

from ptmcli.errors import PtmError
from ptmcli.files import write_whole
from ptmcli.schema import Logger
from ptmcli.typecheck import did_you_mean

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # logger -> package to install
KNOWN = typing.get_args(Logger)


def check(loggers: list[str]) -> None:
    """Refuse an unknown logger, or one whose package is missing, before anything is prepared."""
    for name in loggers:
        if name not in KNOWN:
            raise PtmError(
                f"trainer.loggers: unknown logger '{name}'.{did_you_mean(name, KNOWN)} "
                f"Choose from {', '.join(KNOWN)}, e.g. trainer.loggers=[jsonl,tensorboard]."
            )
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise PtmError(
                f"trainer.loggers includes {name}, but the '{package}' package is not installed. "
                f"Install it with: pip install '{package}' (or pip install 'ptmcli[loggers]'), or drop it from "
                f"trainer.loggers."
            )


def _scalars(row: dict) -> dict[str, float]:
    """`split/name` -> value for the row's numbers (per-class lists and the confusion matrix stay in jsonl)."""
    out = {}
    for key, value in row.items():
        if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{row['split']}/{key}"] = float(value)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events an earlier (killed) process logged after the checkpoint are dropped by readers
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def rows(self, rows: list[dict]) -> None:
        for row in rows:
            for key, value in _scalars(row).items():
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self, run_dir: Path) -> None:
        self.writer.close()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _flat_config(run_dir: Path) -> dict[str, str]:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except OSError:
        return {}
    return {k: str(v)[:500] for k, v in flatten(config).items()}  # MLflow caps a param's length


def _recalled(run_dir: Path, key: str):
    """What run.json holds under `key` (a tracker's run id, W&B's last step sent), or None."""
    try:
        return json.loads((run_dir / "run.json").read_text()).get(key)
    except (OSError, ValueError):
        return None


def _remember(run_dir: Path, key: str, value) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    info[key] = value
    write_whole(run_dir / "run.json", json.dumps(info, indent=1) + "\n", "run")  # a kill leaves the old one


class MLflow:
    def __init__(self, run_dir: Path, tracking_uri: str | None, experiment: str):
        import mlflow

        self.mlflow = mlflow
        uri = tracking_uri or f"sqlite:///{(Path.cwd() / 'runs' / 'mlflow.db').resolve()}"
        artifacts = None  # a tracking server keeps its own artifact store
        if uri.startswith("sqlite:///"):
            store = Path(uri.removeprefix("sqlite:///"))
            store.parent.mkdir(parents=True, exist_ok=True)
            # beside the database, not MLflow's default ./mlruns in whatever directory the run was started from
            artifacts = (store.parent / "mlflow-artifacts").resolve().as_uri()
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        run_id = _recalled(run_dir, "mlflow_run_id")
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=artifacts)
            )
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            _remember(run_dir, "mlflow_run_id", run_id)
            params = _flat_config(run_dir)
            items = list(params.items())
            for i in range(0, len(items), 100):  # the API takes at most 100 params per batch
                batch = [mlflow.entities.Param(k, v) for k, v in items[i : i + 100]]
                self.client.log_batch(run_id, params=batch)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def rows(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, 0, row["step"]) for row in rows for key, value in _scalars(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def last_step(self) -> int:
        """The highest step the tracker holds for this run (0 for a new one)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for k in keys for m in self.client.get_metric_history(self.run_id, k)), default=0)

    def close(self, run_dir: Path) -> None:
        for name in ("config.yaml", "labels.json", "curves.png", "run.json"):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id)


class Wandb:
    def __init__(self, run_dir: Path, experiment: str):
        import wandb

        self.run_dir = run_dir
        run_id = _recalled(run_dir, "wandb_run_id")
        if run_id is None:
            run_id = uuid.uuid4().hex[:8]  # W&B's id format: 8 characters of [a-z0-9]
            _remember(run_dir, "wandb_run_id", run_id)
        self.run = wandb.init(
            project=experiment,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode="offline",  # no account or network; `wandb sync RUN/wandb/offline-run-*` uploads later
            config=_flat_config(run_dir),
        )

    def rows(self, rows: list[dict]) -> None:
        for row in rows:
            self.run.log(_scalars(row), step=row["step"])
        if rows:
            _remember(self.run_dir, "wandb_sent_step", rows[-1]["step"])

    def last_step(self) -> int:
        """An offline run cannot ask the server what it holds, so the run directory keeps the last step sent."""
        return int(_recalled(self.run_dir, "wandb_sent_step") or 0)

    def close(self, run_dir: Path) -> None:
        self.run.finish()


class Sinks:
    """The extra loggers of a run. `row` queues a metrics row; `committed(step)` sends the queued rows up to a
    checkpoint's step to the trackers (TensorBoard gets rows at once); `close` sends the rest and the artifacts."""

    def __init__(self, loggers: list[str], run_dir: Path, start_step: int, tracking_uri: str | None, experiment: str):
        self.run_dir = run_dir
        self.now, self.on_commit = [], []
        if "tensorboard" in loggers:
            self.now.append(TensorBoard(run_dir, start_step))
        if "mlflow" in loggers:
            self.on_commit.append(MLflow(run_dir, tracking_uri, experiment))
        if "wandb" in loggers:
            self.on_commit.append(Wandb(run_dir, experiment))
        self.pending: list[dict] = []
        if start_step and self.on_commit:
            self._catch_up(start_step)

    def _catch_up(self, start_step: int) -> None:
        """On resume, send the rows up to the checkpoint that the tracker lacks: a process killed between writing
        a checkpoint and sending its rows leaves such a gap (metrics.jsonl was cut back to the checkpoint)."""
        from ptmcli.runlog import tail_rows

        rows = [r for r in tail_rows(self.run_dir / "metrics.jsonl", size=1 << 40) if r.get("step", 0) <= start_step]
        for sink in self.on_commit:
            after = sink.last_step()
            missing = [r for r in rows if r["step"] > after]
            if missing:
                sink.rows(missing)

    def row(self, row: dict) -> None:
        for sink in self.now:
            sink.rows([row])
        if self.on_commit:
            self.pending.append(row)

    def committed(self, step: int) -> None:
        ready = [r for r in self.pending if r["step"] <= step]
        self.pending = [r for r in self.pending if r["step"] > step]
        for sink in self.on_commit:
            if ready:
                sink.rows(ready)

    def close(self, finished: bool) -> None:
        """`finished`: the run reached its end (rows after the last checkpoint are final too)."""
        if finished:
            self.committed(math.inf)
        for sink in (*self.now, *self.on_commit):
            sink.close(self.run_dir)
