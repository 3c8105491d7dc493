"""Bad input, concurrent runs, damaged checkpoints and interruptions, through the real CLI: each ends in one
paragraph and exit 2 (or 130 for Ctrl-C), and loses nothing that was already written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptmcli import checkpoint
from tests.conftest import TIMING_KEYS, TINY, fails_with, read_metrics, run_ptm

# A constant learning rate after warmup: the first N steps of a run do not depend on its max_steps, so a run
# stopped at any step and resumed can be compared with this one, row by row.
CONSTANT = [*TINY, "optimizer.schedule=constant", "trainer.log_every=1", "trainer.keep_last=0"]


@pytest.fixture(scope="module")
def reference(cache_env, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hardening") / "reference"
    run_ptm(["pretrain", *CONSTANT, "trainer.max_steps=30", "trainer.save_every=10", f"hydra.run.dir={run}"], cache_env)
    return run


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run) if r["split"] == "train"]


def test_bad_inputs_get_one_paragraph_and_change_nothing(reference, cache_env, tmp_path):
    """Each case: exit 2, no traceback, a message naming the key or file, the run it names byte-identical and no
    new directory left behind. `{run}` is each case's own copy of a finished run."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 society and the pound (\xa3) fell.\n\nA second paragraph here.\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x00\x01 not a tokenizer")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("task:\n  kind: text-cls\n data:\n  train: x.csv\n")
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("text,label\n" + "".join(f"row {i} text,{'' if i in (3, 7) else i % 2}\n" for i in range(12)))
    fresh = tmp_path / "fresh"  # nothing must exist under it afterwards: a refused command leaves no directory
    fresh.mkdir()
    in_run = ["hydra.run.dir={run}", "resume=auto"]
    cases = [
        (["pretrain", *TINY, "optimizer.lr=nan", *in_run], "optimizer.lr=nan is not a finite number"),
        (["pretrain", *TINY, "model.num_heads=0", *in_run], "model.num_heads=0 is out of range"),
        (["pretrain", *TINY, "data.max_seq_len=128", *in_run], "model.max_positions"),
        (["pretrain", *TINY, "trainer.keep_last=-1", f"hydra.run.dir={fresh / 'a' / 'run'}"], "trainer.keep_last=-1"),
        (["pretrain", *TINY, "data=files", f"hydra.run.dir={fresh / 'b'}"], "data.source is not set"),
        (["pretrain", *TINY, "data=files", f"data.source={tmp_path / 'nope.txt'}", *in_run], "does not exist"),
        (["pretrain", *TINY, "data=files", f"data.source={empty}", f"hydra.run.dir={fresh / 'c'}"], "corpus is empty"),
        (
            ["pretrain", *TINY, "data=files", f"data.source={latin1}", *in_run],
            f"data.source='{latin1}' is not utf-8 text: byte 3 is 0xe9",
        ),
        (["pretrain", *TINY, f"data.tokenizer={junk}", f"hydra.run.dir={fresh / 'd'}"], f"data.tokenizer='{junk}'"),
        (  # a metric the objective never reports: before the run starts, not at its first validation
            ["pretrain", *TINY, "trainer.metric=val/acc", f"hydra.run.dir={fresh / 'g'}"],
            "trainer.metric=val/acc is not a validation metric here; choose one of val/mlm_loss, val/mlm_accuracy",
        ),
        (["pretrain", *TINY, f"resume={tmp_path}", f"hydra.run.dir={fresh / 'e'}"], "holds no complete checkpoint"),
        (["pretrain", *TINY, "model.num_layers=3", "resume={run}", "hydra.run.dir={run}"], "another architecture"),
        (["pretrain", *TINY, "trainer.max_steps=20", "hydra.run.dir={run}"], "already holds checkpoints"),
        (["finetune", "task=news-cls", "trainer.max_steps=5", "trainer.epochs=2"], "give one of them"),
        (["finetune", f"task={broken_yaml}", f"hydra.run.dir={fresh / 'f'}"], "is not valid YAML at line 3, column 2"),
        (["finetune", f"task={tmp_path / 'nope.yaml'}"], "nope.yaml' does not exist"),
        (["finetune", f"task={tmp_path}/"], "is a directory"),
        (
            ["finetune", "task=text-cls", f"data.train={unlabeled}", "model=bert-tiny", f"hydra.run.dir={fresh}"],
            "2 row(s) have no label in data.label_column='label' (rows 4, 8",
        ),
        (["evaluate", f"run={junk}"], "is a file; give a run directory"),
        (["predict", f"run={reference}", f"input={latin1}"], "is a pretraining run"),
        (["generate", f"run={reference}", f"input={tmp_path}"], f"input='{tmp_path}' is a directory, not a file"),
        (["export", f"run={reference}", f"output={junk}/x"], "has a part of its path that is a file"),
    ]
    before = _snapshot(reference)
    copies = []
    for i, (args, expected) in enumerate(cases):
        if any("{run}" in a for a in args):
            copies.append(tmp_path / f"run{i}")
            shutil.copytree(reference, copies[-1], symlinks=True)
            args = [a.replace("{run}", str(copies[-1])) for a in args]
        fails_with(args, cache_env, expected)
    assert all(_snapshot(run) == before for run in [reference, *copies])
    assert list(fresh.iterdir()) == []  # it existed before, empty: it stays, and nothing was made inside


def test_yaml_tags_in_a_task_file_run_nothing(cache_env, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"task:\n  kind: !!python/object/apply:os.system ['touch {marker}']\n")
    fails_with(["finetune", f"task={evil}"], cache_env, "is not valid YAML")
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text("hydra:\n  callbacks:\n    x:\n      _target_: builtins.exec\n")
    fails_with(["finetune", f"task={callbacks}"], cache_env, "sets unknown section(s) hydra")
    assert not marker.exists()


def test_a_second_run_in_a_busy_directory_stops_and_ctrl_c_saves(reference, cache_env, tmp_path):
    """Run A holds its directory: B stops at once naming A's pid. Ctrl-C stops A at a step boundary with a
    checkpoint and one line; resumed, it continues exactly as a run that was never interrupted."""
    run = tmp_path / "run"
    args = ["pretrain", *CONSTANT, "trainer.save_every=0", f"hydra.run.dir={run}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "ptmcli", *args, "trainer.max_steps=1000"],
        env=cache_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    second = fails_with([*args, "trainer.max_steps=1000"], cache_env, f"is in use by process {first.pid}")
    assert "nothing was changed" in second
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted:")]
    stopped = int(line.split("stopped at step ")[1].split()[0])
    assert f"checkpoint step-{stopped} written" in line and f"resume={run}" in line
    assert not (run / ".lock").exists() and checkpoint.latest(run / "checkpoints").name == f"step-{stopped}"
    straight = tmp_path / "straight"
    both = [  # the resumed run, and one never interrupted, side by side
        subprocess.Popen(
            [sys.executable, "-m", "ptmcli", *a, f"trainer.max_steps={stopped + 3}"],
            env=cache_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for a in ([*args, f"resume={run}"], [*args[:-1], f"hydra.run.dir={straight}"])
    ]
    assert [p.wait(timeout=300) for p in both] == [0, 0]
    assert _train_rows(run) == _train_rows(straight)


def test_damaged_checkpoints_are_named_and_resume_falls_back(reference, cache_env, tmp_path):
    newest = reference / "checkpoints" / "step-30"
    for name in sorted(p.name for p in newest.iterdir() if p.name != checkpoint.MARKER):
        copy = tmp_path / name
        shutil.copytree(newest, copy)
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[: len(data) // 2])
        assert f"{name} is {len(data) // 2:,} bytes where {len(data):,} were written" in checkpoint.damage(copy)
        (copy / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
        assert f"{name} does not have the checksum" in checkpoint.damage(copy)
        (copy / name).unlink()
        assert checkpoint.damage(copy) == f"{name} is missing"
    assert checkpoint.damage(newest) is None
    # through the CLI: export names the damaged file; resume=auto skips the checkpoint and says why
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    with open(run / "checkpoints" / "step-30" / "trainer_state.json", "r+") as f:
        f.truncate(10)
    partial = run / "checkpoints" / "step-40"  # a later write killed before its marker: not a checkpoint at all
    shutil.copytree(run / "checkpoints" / "step-20", partial)
    (partial / checkpoint.MARKER).unlink()
    fails_with(["export", f"run={run}"], cache_env, "is damaged: trainer_state.json is 10 bytes where")
    out = run_ptm(
        ["pretrain", *CONSTANT, "trainer.max_steps=30", "trainer.save_every=10", f"hydra.run.dir={run}", "resume=auto"],
        cache_env,
    )
    assert "skipped damaged checkpoint(s) step-30 (trainer_state.json is 10 bytes" in out.stderr
    assert "from step-20" in out.stderr
    assert _train_rows(run) == _train_rows(reference) and checkpoint.damage(run / "checkpoints" / "step-30") is None


def test_max_steps_on_the_command_line_wins_over_the_task_files_epochs(cache_env):
    """--cfg job shows what will run: the typed step count, with the task file's epochs cleared."""
    out = run_ptm(["finetune", "task=news-cls", "trainer.max_steps=7", "--cfg", "job"], cache_env).stdout
    assert "max_steps: 7" in out and "epochs: null" in out
    out = run_ptm(["finetune", "task=news-cls", "--cfg", "job"], cache_env).stdout
    assert "epochs: 3" in out


def test_a_task_file_of_your_own_with_unlabeled_rows_dropped_on_request(reference, cache_env, tmp_path):
    """task=my_task.yaml (no package header needed) trains like a shipped task; integer labels stay integers; a
    row without a label is dropped only when asked, and counted."""
    rows = [(f"the match ended with a late goal number {i}", 1) for i in range(12)]
    rows += [(f"shares fell on the market report number {i}", 0) for i in range(12)]
    table = tmp_path / "mine.csv"
    table.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows) + "an unlabeled row,\n")
    task = tmp_path / "my_task.yaml"
    task.write_text(
        f"task:\n  kind: text-cls\n  max_seq_len: 32\ndata:\n  name: mine\n  train: {table}\n"
        "  drop_unlabeled: true\ntrainer:\n  epochs: 1\n  batch_size: 8\n"
    )
    run = tmp_path / "run"
    out = run_ptm(
        ["finetune", f"task={task}", f"init={reference}", "trainer.max_steps=2", f"hydra.run.dir={run}"], cache_env
    )
    assert "dropped 1 row(s) without a label" in out.stderr and "2 steps" in out.stderr
    assert json.loads((run / "labels.json").read_text()) == ["0", "1"]
    assert (run / ".hydra" / "overrides.yaml").exists() and not (run / ".lock").exists()


def test_os_errors_read_as_sentences(tmp_path):
    from ptmcli.files import os_error, read_text

    with pytest.raises(Exception, match="is a directory, not a file"):
        read_text(tmp_path, "input")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("hello".encode("utf-8-sig"))
    assert read_text(bom, "input") == "hello"
    bom.write_bytes("hello".encode("utf-16"))
    assert read_text(bom, "input") == "hello"
    err = os_error(OSError(28, "No space left on device", str(tmp_path / "x")), "output")
    assert str(err) == f"output='{tmp_path / 'x'}' cannot be written: no space left on device."
    assert str(os_error(ConnectionError("Couldn't reach 'x'\non the Hub"))) == "Couldn't reach 'x' on the Hub."
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        with pytest.raises(Exception, match="permission denied"):
            read_text(locked, "input")


class _Numbers:
    """A few fixed vectors as a training set: the property under test does not depend on text."""

    def __len__(self) -> int:
        return 8

    def batch(self, indices: list[int], epoch: int) -> dict:
        import torch

        x = torch.arange(len(indices) * 4, dtype=torch.float32).view(len(indices), 4) / 10
        return {"x": x, "counts": {"mse": len(indices)}, "num_tokens": len(indices)}


class _Regression:
    terms = ("mse",)
    stats = ()

    def __init__(self, scale: float):
        self.scale = scale  # 0: a loss that reaches no weight (every gradient zero)

    def __call__(self, model, batch):
        return {"mse": self.scale * (model(batch["x"]) - 1).pow(2).sum()}, {}

    def metrics(self, sums, counts, stats):
        return {"loss": sums["mse"] / counts["mse"]}


@pytest.mark.parametrize("clip", [1.0, None])
def test_a_first_step_with_every_gradient_zero_stops_before_it_writes(tmp_path, clip):
    """torch.compile on CUDA (torch 2.11, an H200) gave a model whose loss was right and whose gradients were zero:
    a run like that would log a flat loss for hours. The loop stops at the first step instead, exit 2 through the
    CLI's PtmError, nothing saved; a loss that reaches the weights trains on."""
    import torch

    from ptmcli import loop
    from ptmcli.distributed import Dist
    from ptmcli.errors import PtmError
    from ptmcli.hardware import Hardware
    from ptmcli.schema import HardwareConfig, OptimizerConfig, TrainerConfig

    def run(scale: float, run_dir: Path):
        run_dir.mkdir()
        torch.manual_seed(0)
        job = loop.Job(torch.nn.Linear(4, 1), _Regression(scale), _Numbers(), _Numbers(), {"family": "test"})
        trainer = TrainerConfig(max_steps=3, batch_size=4, eval_every=0, save_every=0, curves=False, max_grad_norm=clip)
        hw = Hardware(torch.device("cpu"), torch.float32)
        loop.train(job, trainer, OptimizerConfig(), hw, Dist(), run_dir, None, HardwareConfig())

    with pytest.raises(PtmError, match="no weight it trains reaches the loss"):
        run(0.0, tmp_path / "zero")
    assert not (tmp_path / "zero" / "checkpoints").exists()
    run(1.0, tmp_path / "learns")
    assert (tmp_path / "learns" / "checkpoints").exists()
    with pytest.raises(PtmError, match="hardware.compile=false"):  # a compiled run is told what was seen and why
        loop.refuse_zero_gradients(0.0, compiled=True)


def test_a_run_stopped_at_its_first_step_shows_its_own_error_not_the_curves(tmp_path):
    """Curves are drawn however a run ends; one that stopped before its first row was logged had no metrics.jsonl
    to draw, and that error took the place of the run's own (a T5 run with transfer=prefix said only "no readable
    metrics.jsonl"). Nothing is drawn then, and the run's own error is the one shown."""
    import torch

    from ptmcli import loop
    from ptmcli.distributed import Dist
    from ptmcli.errors import PtmError
    from ptmcli.hardware import Hardware
    from ptmcli.schema import HardwareConfig, OptimizerConfig, TrainerConfig

    job = loop.Job(torch.nn.Linear(4, 1), _Regression(0.0), _Numbers(), _Numbers(), {"family": "test"})
    trainer = TrainerConfig(max_steps=3, batch_size=4, eval_every=0, save_every=0, curves=True)
    with pytest.raises(PtmError, match="no weight it trains reaches the loss"):
        loop.train(job, trainer, OptimizerConfig(), Hardware(torch.device("cpu"), torch.float32), Dist(), tmp_path,
                   None, HardwareConfig())  # fmt: skip
    assert not (tmp_path / "curves.png").exists()


def test_predict_inputs_with_a_field_of_the_wrong_type_name_the_line(tmp_path):
    from ptmcli.errors import PtmError
    from ptmcli.inference import read_records

    cases = [
        ("text-cls", '{"text": "fine"}\n{"text": 5}\n', r'x.jsonl:2: "text" is a JSON number, not a string'),
        ("pair-cls", '{"text": "a", "text_pair": null}\n', r'x.jsonl:1: "text_pair" is a JSON null, not a string'),
        ("token-cls", '{"tokens": "EU rejects"}\n', r'x.jsonl:1: "tokens" must be a list of strings'),
        ("token-cls", '{"text": ["EU"]}\n', r'x.jsonl:1: "tokens" must be a list of strings .*or "text" a string'),
        ("qa", '{"question": "Who?", "context": 7}\n', r'x.jsonl:1: "context" is a JSON number'),
    ]
    for kind, text, expected in cases:
        (tmp_path / "x.jsonl").write_text(text)
        with pytest.raises(PtmError, match=expected):
            read_records(tmp_path / "x.jsonl", kind)
    (tmp_path / "x.jsonl").write_text('{"text": "EU rejects German call"}\nPeter Blackburn\n')
    assert [r["tokens"] for r in read_records(tmp_path / "x.jsonl", "token-cls")] == [
        ["EU", "rejects", "German", "call"],
        ["Peter", "Blackburn"],
    ]
    (tmp_path / "x.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        PtmError, match=r"input='.*x.txt' is not utf-8 text: byte 3 is 0xe9.*Re-save the file as UTF-8 \("
    ):
        read_records(tmp_path / "x.txt", "text-cls")


def test_an_interrupted_export_leaves_the_earlier_one_whole(reference, tmp_path, monkeypatch):
    from ptmcli import hf
    from ptmcli.export import export_run

    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export_run(reference, output=out)
    before = _snapshot(out)
    assert {"model.safetensors", "config.json", "tokenizer.json", "notes.txt"} <= {p.name for p in before}

    def interrupted(out_dir, *args, **kwargs):
        (out_dir / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(reference, output=out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging directory left


def test_an_output_file_is_replaced_whole_or_not_at_all(tmp_path):
    """predict/generate/embed output=, eval_*.json and run.json: an interrupted write keeps the file it replaces."""
    from ptmcli.errors import PtmError
    from ptmcli.files import replaced_whole, write_whole

    out = tmp_path / "predictions.jsonl"
    write_whole(out, "earlier\n")
    with pytest.raises(KeyboardInterrupt):
        with replaced_whole(out, "output") as f:
            f.write("half of the new one")
            raise KeyboardInterrupt
    assert out.read_text() == "earlier\n" and sorted(tmp_path.iterdir()) == [out]
    with replaced_whole(out, "output") as f:
        f.write("new\n")
    assert out.read_text() == "new\n" and sorted(tmp_path.iterdir()) == [out]
    with pytest.raises(PtmError, match=f"output='{out}/x' has a part of its path that is a file"):
        write_whole(out / "x", "")


@pytest.mark.parametrize(
    "module,signum",
    [("torch.distributed.rpc", signal.SIGINT), ("ptmcli.pretrain", signal.SIGTERM)],
)
def test_a_signal_before_training_stops_with_one_line_and_leaves_nothing(cache_env, tmp_path, module, signum):
    """The signal arrives as `module` is imported. SIGINT while torch is imported (the second or so a run spends
    there) left torch.distributed half initialised, the exit path imported it again to close it, and the interpreter
    crashed (a segfault after a traceback). SIGTERM after Hydra made the run directory killed the process on the
    spot and left the directory behind."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # started in the background, it is ignored
        "class Signal:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        f"            os.kill(os.getpid(), {int(signum)})\n"
        "sys.meta_path.insert(0, Signal())\n"
        "sys.argv = ['ptm', 'pretrain', *sys.argv[1:]]\n"
        "from ptmcli.cli import run\n"
        "run()\n"
    )
    env = {**cache_env, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}  # no restart: it would drop the finder
    proc = subprocess.run(
        [sys.executable, "-c", script, *TINY, "trainer.max_steps=2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 128 + signum, proc.stderr
    assert proc.stderr.strip() == "interrupted: stopped at once; the run's last checkpoint (if any) is intact."
    assert not (tmp_path / "runs").exists()
