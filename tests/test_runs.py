"""`ptm runs`: a finished, an early-stopped, a killed and a running run are each labelled so, filtered, sorted and
compared; how a run ended is recorded in run.json and cleared when it resumes."""

from __future__ import annotations

import json
import shutil
import signal
import struct

import pytest

from ptmcli import rundir
from ptmcli.cli import main
from tests.conftest import TINY, kill_after_checkpoint

SHORT = [*TINY, "data.max_train_samples=100", "trainer.eval_every=3", "trainer.save_every=3", "trainer.log_every=3"]


def _ptm(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as exit_:  # Hydra exits after the job
        assert not exit_.code, args


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """runs/finished (6 of 6 steps), runs/early (stops at step 2: val/loss is to be maximised while it falls),
    runs/killed (the finished run as a SIGKILL after step 3 leaves it: no end recorded, step-6 never written)."""
    root = tmp_path_factory.mktemp("runs")
    _ptm(["pretrain", *SHORT, "trainer.max_steps=6", f"hydra.run.dir={root / 'finished'}"])
    _ptm(
        [
            "pretrain",
            *SHORT,
            "trainer.max_steps=30",
            "trainer.eval_every=1",
            "trainer.metric_mode=max",
            "trainer.patience=1",
            f"hydra.run.dir={root / 'early'}",
        ]
    )
    killed = root / "killed"
    shutil.copytree(root / "finished", killed)
    info = json.loads((killed / "run.json").read_text())
    assert info.pop("ended")["status"] == "completed"
    (killed / "run.json").write_text(json.dumps(info))
    rows = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 4))
    for newest in ("step-6", "latest", "best"):
        path = killed / "checkpoints" / newest
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    return root


def _listed(capsys, *args) -> list[dict]:
    capsys.readouterr()
    _ptm(["runs", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_each_run_is_labelled_by_how_it_ended(runs_root, capsys):
    status = {r["path"].rsplit("/", 1)[-1]: r for r in _listed(capsys, str(runs_root))}
    assert (status["killed"]["step"], status["killed"]["max_steps"]) == (3, 6)
    assert {k: v["status"] for k, v in status.items()} == {
        "finished": "finished",
        "early": "stopped early",
        "killed": "killed",
    }
    assert (status["finished"]["step"], status["finished"]["max_steps"]) == (6, 6)
    assert status["early"]["step"] == 2 and status["early"]["max_steps"] == 30
    assert status["finished"]["command"] == "pretrain" and status["finished"]["model"] == "bert"
    assert status["finished"]["loss"] > 0 and status["finished"]["tokens_per_s"] > 0
    assert status["finished"]["metric"] == "val/loss" and status["finished"]["best"] > 0
    # a live process holds the lock: running, not killed
    assert rundir._lock(runs_root / "killed") is None
    try:
        assert {r["status"] for r in _listed(capsys, str(runs_root / "killed"))} == {"running"}
    finally:
        rundir.release()


def test_filter_sort_table_and_compare(runs_root, capsys):
    only = _listed(capsys, str(runs_root), "--where", "trainer.patience=1")
    assert [r["status"] for r in only] == ["stopped early"]
    assert len(_listed(capsys, str(runs_root), "--where", "optimizer.lr=2e-3")) == 3  # 0.002 in config.yaml
    assert len(_listed(capsys, str(runs_root), "--where", "trainer.max_steps=6")) == 2
    ordered = _listed(capsys, str(runs_root), "--sort", "val/loss")
    losses = [r["final"]["val/loss"] for r in ordered]
    assert losses == sorted(losses)
    capsys.readouterr()
    _ptm(["runs", str(runs_root)])
    table = capsys.readouterr().out
    assert "stopped early" in table and "killed" in table and "6/6" in table
    _ptm(["runs", "compare", str(runs_root / "finished"), str(runs_root / "early")])
    shown = capsys.readouterr().out
    assert "trainer.patience" in shown and "trainer.metric_mode" in shown and "optimizer.lr" not in shown
    assert "best val/loss" in shown and "final val/loss" in shown
    for option, typo, match in (("--sort", "val/los", "val/loss"), ("--where", "optimizer.lt=2e-3", "optimizer.lr")):
        with pytest.raises(SystemExit) as exit_:  # a key no run has is a typo, not an empty answer
            main(["runs", str(runs_root), option, typo])
        assert (
            exit_.value.code == 2 and f"has '{typo.split('=')[0]}'. Did you mean '{match}'?" in capsys.readouterr().err
        )
    count = len(_listed(capsys, str(runs_root)))
    _ptm(["runs", str(runs_root), "--where", "optimizer.lr=5"])
    assert f"none of the {count} runs under" in " ".join(capsys.readouterr().out.split())


def test_long_preparation_shows_counted_bars_and_checkpoint_sizes(monkeypatch):
    """On a terminal, the datasets/tokenizers bars (which count examples and merges) are on during a counted step
    and back off after it; a checkpoint's announced size is what its files hold."""
    import datasets
    import torch

    from ptmcli import checkpoint, runlog

    datasets.disable_progress_bars()
    monkeypatch.setattr(runlog.console, "_force_terminal", True)
    with runlog.counted("tokenizing", show=True) as shown:
        assert shown and datasets.is_progress_bar_enabled()
    assert not datasets.is_progress_bar_enabled()
    with runlog.counted("tokenizing", show=False) as shown:  # not rank 0
        assert not shown and not datasets.is_progress_bar_enabled()

    # a tied output layer is written once; AdamW keeps two moments per weight (and a step count per tensor)
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.arange(10)).sum().backward()
    optimizer.step()
    assert checkpoint.megabytes(model, optimizer) == pytest.approx((3 * 64_000 * 4 + 4) / 1e6)


def test_runs_started_in_the_same_second_each_get_a_directory(tmp_path):
    """Seeds launched together share Hydra's stamped directory name: the second run takes `<stamp>-2` (removed
    again if it is refused before writing), a finished run's directory is never reused, and a directory the user
    named (hydra.run.dir) is never swapped for another: the second run there stops."""
    from ptmcli.distributed import Dist
    from ptmcli.errors import PtmError

    stamped = tmp_path / "bert-mini" / "2026-12-03_15-00-00"
    stamped.mkdir(parents=True)  # as Hydra makes it
    try:
        first, _ = rundir.prepare(stamped, {"seed": 0}, "pretrain", "bert-mini", Dist())
        second, _ = rundir.prepare(stamped, {"seed": 1}, "pretrain", "bert-mini", Dist())
        assert first == stamped and second == stamped.with_name(stamped.name + "-2")
        with pytest.raises(PtmError, match="is in use by process"):
            rundir.prepare(stamped, {"seed": 2}, "pretrain", "bert-mini", Dist(), named=True)
        rundir.release_one(second)
        assert not second.exists()
        rundir.record(first, {"seed": 0}, "pretrain", "bert-mini", Dist())
        rundir.release()
        third, _ = rundir.prepare(stamped, {"seed": 3}, "pretrain", "bert-mini", Dist())
        assert third == second and json.loads((first / "run.json").read_text())["config_hash"]
    finally:
        rundir.release()


def test_bad_runs_arguments_are_one_line_errors(tmp_path, capsys):
    for args, words in (
        (["runs", str(tmp_path / "nowhere")], "does not exist"),
        (["runs", "compare", str(tmp_path)], "two or more"),
        (["runs", "compare", str(tmp_path), str(tmp_path)], "not a run directory"),
        (["runs", "--where", "lr"], "key=value"),
        (["runs", "--bogus"], "unknown option"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2 and words in capsys.readouterr().err


def wandb_records(path):
    """The protobuf records of a W&B transaction log (`run-ID.wandb`): a 7-byte header, then LevelDB-style 32 KiB
    blocks of fragments, each checksum(4) length(2) type(1: full, 2: first, 3: middle, 4: last) and data."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_every_logger_holds_each_step_once_after_a_kill_and_resume(cache_env, tmp_path, capsys):
    """The event files (read by TensorBoard's own EventAccumulator), the MLflow run (read by MlflowClient from
    the SQLite store) and the offline W&B run (its transaction logs) hold exactly metrics.jsonl's values, each
    step once, after SIGKILL + resume=auto; the run ends with a curves.png that MLflow keeps as an artifact, and
    `ptm plot` draws two runs into one PNG."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    matplotlib_image = pytest.importorskip("matplotlib.image")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "pretrain",
        *SHORT,
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "trainer.eval_every=4",
        "trainer.curves=true",
        "trainer.loggers=[jsonl,tensorboard,mlflow,wandb]",
        f"trainer.tracking_uri={store}",
        f"hydra.run.dir={run}",
    ]
    assert kill_after_checkpoint(args, cache_env, run / "checkpoints" / "step-3") == -signal.SIGKILL
    _ptm([*args, "resume=auto"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {(r["split"], r["step"]): r["loss"] for r in rows}
    assert len(expected) == len(rows) == 8 + 2  # train rows 1..8, validation at 4 and 8

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for split in ("train", "val"):
        seen = [(e.step, e.value) for e in events.Scalars(f"{split}/loss")]
        assert [s for s, _ in seen] == sorted(s for sp, s in expected if sp == split)  # each step once
        for step, value in seen:
            assert value == pytest.approx(expected[(split, step)], rel=1e-6)

    client = MlflowClient(tracking_uri=store)
    run_id = json.loads((run / "run.json").read_text())["mlflow_run_id"]
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.data.params["trainer.max_steps"] == "8"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    for m in history:
        assert m.value == pytest.approx(expected[("train", m.step)], rel=1e-6)
    assert {"config.yaml", "curves.png"} <= {a.path for a in client.list_artifacts(run_id)}
    assert tracked.info.artifact_uri.startswith((tmp_path / "mlflow-artifacts").as_uri())  # beside the database

    # W&B: one offline run directory per process, the same run id in both, each step sent once across them
    wandb_id = json.loads((run / "run.json").read_text())["wandb_run_id"]
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{wandb_id}.wandb" for p in logs)
    sent, config = [], {}
    for log in logs:
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                sent.append((record.history.step.num, items.get("train/loss"), items.get("val/loss")))
            elif kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
    assert [step for step, *_ in sent] == list(range(1, 9))
    for step, train_loss, val_loss in sent:
        assert train_loss == pytest.approx(expected[("train", step)], rel=1e-6)
        assert val_loss == (pytest.approx(expected[("val", step)], rel=1e-6) if step % 4 == 0 else None)
    assert config["trainer.max_steps"] == "8"

    curves = matplotlib_image.imread(run / "curves.png")
    assert curves.shape[:2] == (400, 1500) and curves[..., :3].std() > 0.05  # three panels, not blank
    other = tmp_path / "other"
    _ptm(["pretrain", *SHORT, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={other}"])
    out = tmp_path / "plots" / "both.png"  # a folder that does not exist yet is made
    _ptm(["plot", f"run={run}", f"run={other}", "metric=val/loss", f"output={out}"])
    picture = matplotlib_image.imread(out)
    assert picture.shape[:2] == (500, 800) and picture[..., :3].std() > 0.05
    _ptm(["plot", f"run={run}", "metric=val/loss", f"output={out.with_suffix('.svg')}"])
    assert out.with_suffix(".svg").read_text().lstrip().startswith("<?xml")  # the format the name says
    for args, words in (
        ([f"run={run}", "metric=val/bleu"], "logged no val/bleu"),
        ([f"run={run}", "metric=val/loss", f"output={out.with_suffix('.txt')}"], "matplotlib writes"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["plot", *args])
        assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["both.png", "both.svg"]


def test_a_logger_whose_package_is_missing_fails_at_start(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", *TINY, "trainer.loggers=[jsonl,wandb]", f"hydra.run.dir={tmp_path / 'r'}"])
    assert exit_.value.code == 2
    assert "pip install 'wandb'" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_sweep_ends_with_its_jobs_best_first(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _ptm(
        [
            "pretrain",
            *TINY,
            "data.max_train_samples=100",
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            "optimizer.lr=1e-4,3e-3",
            f"hydra.sweep.dir={sweep}",
            "-m",
        ]
    )
    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["metric"] == "val/loss" and len(summary["jobs"]) == 2
    bests = [job["best"] for job in summary["jobs"]]
    assert bests == sorted(bests) and {job["optimizer.lr"] for job in summary["jobs"]} == {1e-4, 3e-3}
    assert "best val/loss first" in capsys.readouterr().err
