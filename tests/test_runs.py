"""`ptm runs`: a finished, an early-stopped, a killed and a running run are each labelled so, filtered, sorted and
compared; how a run ended is recorded in run.json and cleared when it resumes."""

from __future__ import annotations

import json
import shutil

import pytest

from ptmcli import rundir
from ptmcli.cli import main
from tests.conftest import TINY

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
