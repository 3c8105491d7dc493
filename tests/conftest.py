"""Shared helpers: run the real `ptm` CLI in a subprocess with a small, fast configuration on real news text."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.forkserver import FORKS

ROOT = Path(__file__).resolve().parents[1]

# A few-second BERT on 300 real news articles; dropout off so that runs compare exactly.
TINY = [
    "model=bert-tiny",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.intermediate_size=128",
    "model.max_positions=64",
    "data.max_seq_len=64",
    "data.vocab_size=2000",
    "data.max_train_samples=300",
    "trainer.batch_size=8",
    "trainer.eval_batches=4",
    "optimizer.lr=2e-3",
    "optimizer.warmup_steps=5",
    "trainer.curves=false",  # pictures are tested on their own (tests/test_runs.py)
]


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory) -> dict:
    """One tokenizer/datasets cache for the whole session, kept out of the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    env = dict(os.environ)
    env.update(
        PTM_CACHE=str(cache / "ptm"),
        HF_DATASETS_CACHE=str(cache / "datasets"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        COLUMNS="200",
    )
    return env


@pytest.fixture(autouse=True)
def _offline_cache(cache_env, monkeypatch):
    for key in ("PTM_CACHE", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, cache_env[key])


# Commands that read a run or a config and train nothing: run_ptm runs them in the test's process, where the
# imports are warm, instead of paying a fresh interpreter's start-up (3-4 s) each time.
IN_PROCESS = {"export", "generate", "evaluate", "predict", "embed", "validate", "cat", "ls", "runs", "plot"}


def _in_process(args: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from ptmcli.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _forked(args: list[str], env: dict, cwd: Path | None) -> subprocess.CompletedProcess | None:
    """`ptm ARGS` in a process forked from one that has imported torch and ptm already (tests/forkserver.py)."""
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        child = FORKS.start(args, env, cwd, out, err)
        if child is None:
            return None
        code = child.wait(timeout=600)
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())


def run_ptm(args: list[str], env: dict, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    if args and args[0] in IN_PROCESS and cwd is None:  # `env` is what the autouse fixture set here already
        proc = _in_process(args)
    else:
        proc = _forked(args, env, cwd) or subprocess.run(
            [sys.executable, "-m", "ptmcli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"ptm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def fails_with(args: list[str], env: dict, expected: str) -> str:
    """Run ptm in this process (a refusal comes before any training, so a fresh interpreter would only add its
    start-up), expecting exit status 2 with `expected` in the message. `env` is what the autouse fixture already
    set. An exception other than the exit fails the test with its traceback."""
    import contextlib
    import io

    from ptmcli.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2, err.getvalue()
    assert expected in err.getvalue(), err.getvalue()
    return err.getvalue()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = {"tokens_per_s", "samples_per_s", "mfu", "peak_memory_mb"}


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def rewound(run: Path, dest: Path, last: int, back_to: int) -> Path:
    """A copy of a finished run as if it had stopped at checkpoint step-`back_to`: step-`last` removed, `latest`
    pointing back (and a `best` that pointed at the removed step dropped). Resuming it must give the same rows."""
    shutil.copytree(run, dest, symlinks=True)
    shutil.rmtree(dest / "checkpoints" / f"step-{last}")
    for link in ("latest", "best"):
        path = dest / "checkpoints" / link
        if link == "latest" or not path.exists():
            path.unlink(missing_ok=True)
    (dest / "checkpoints" / "latest").symlink_to(f"step-{back_to}")
    return dest


def kill_after_checkpoint(args: list[str], env: dict, checkpoint: Path) -> int:
    """Start ptm, SIGKILL it as soon as `checkpoint` is complete; returns its exit status."""
    proc = FORKS.start(args, env, None, Path(os.devnull), Path(os.devnull)) or subprocess.Popen(
        [sys.executable, "-m", "ptmcli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (checkpoint / "COMPLETE").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


# The longest modules first: `make test` hands whole modules to two workers in this order, so the long ones
# start at once instead of after the quick ones (measured per module in sequence: ~6, 3, 2.5, 2.3 min).
LONG_MODULES = ("test_families_cli", "test_peft_cli", "test_finetune_cli", "test_pretrain_cli")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.module.__name__.rpartition(".")[2]
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order within a module is kept


# One input per task kind for `ptm predict` / `ptm generate` (JSON lines where a kind needs named fields).
PREDICT_INPUT = {
    "text-cls": "The striker scored twice as the club won the cup final.",
    "pair-cls": json.dumps(
        {"text": "Bank profits fall", "text_pair": "Shares in the bank fell after profits dropped."}
    ),
    "token-cls": "Gordon Brown spoke in London on Monday",
    "qa": json.dumps({"question": "Which person is mentioned?", "context": "Gordon Brown spoke in London on Monday ."}),
    "text2text": "Shares in the bank fell sharply on Monday after profits dropped.",
    "pretraining": "The government said on Monday that",
}


def run_commands(run: Path, kind: str, tmp: Path, commands=("evaluate", "predict", "generate", "export")) -> dict:
    """Each run command on `run` through the CLI's entry point, in this process (the imports are warm): it must
    finish (0) or refuse in one sentence (2) -- any other exception fails the calling test. {command: status}."""
    from ptmcli.cli import main

    source = tmp / f"{kind}-input.txt"
    source.write_text(PREDICT_INPUT[kind] + "\n")
    args = {
        "evaluate": ["split=test"],
        "predict": [f"input={source}", f"output={tmp / 'predictions.jsonl'}"],
        "generate": [f"input={source}", f"output={tmp / 'generated.jsonl'}", "max_new_tokens=4"],
        "export": [f"output={tmp / 'export'}"],
    }
    status = {}
    for command in commands:
        try:
            main([command, f"run={run}", *args[command]])
            status[command] = 0
        except SystemExit as stop:
            status[command] = stop.code
    return status
