"""glibc's malloc set up for training: `ptm`'s model commands start again with the tcache off, a user's own
GLIBC_TUNABLES setting wins, and nothing changes without glibc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ptmcli import cli, malloc

needs_glibc = pytest.mark.skipif(not malloc.glibc(), reason="glibc's malloc only")
# mallinfo2 (glibc >= 2.33) reports freed blocks the tcache holds as in use
needs_mallinfo2 = pytest.mark.skipif(malloc.heap_info() is None, reason="glibc >= 2.33 only")


@needs_glibc
def test_the_tcache_is_turned_off_and_other_tunables_are_kept():
    assert malloc.tuned_environment({"HOME": "/h"}) == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    kept = malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.mxfast=0"})
    assert kept == {"GLIBC_TUNABLES": "glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0"}


def test_a_users_own_tcache_setting_or_another_libc_changes_nothing(monkeypatch):
    assert malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None
    assert malloc.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.mxfast=0:glibc.malloc.tcache_count=3"}) is None
    monkeypatch.setattr(malloc, "glibc", lambda: False)
    assert malloc.tuned_environment({}) is None


# Run in a fresh interpreter: restarts tuned, then says whether glibc took 8 freed blocks of 200 bytes back or kept
# them as in use (its tcache holds up to 7 freed blocks of a size).
RESTARTED = """
import ctypes, os
from ptmcli.malloc import heap_info, restart_tuned
print("started", os.environ.get("GLIBC_TUNABLES"), flush=True)
restart_tuned()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
heap_info()  # opens glibc once, before the measured blocks
blocks = [libc.malloc(200) for _ in range(8)]
in_use = heap_info().uordblks
for block in blocks:
    libc.free(block)
taken_back = in_use - heap_info().uordblks >= 8 * 200
print("running", os.getpid(), os.environ["GLIBC_TUNABLES"], "taken back" if taken_back else "freed blocks kept")
print("MKL_DISABLE_FAST_MM", os.environ.get("MKL_DISABLE_FAST_MM"))
"""


def run_restarted(tunables: str | None, mkl_memory: str | None = None) -> tuple[list[str], int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MKL_DISABLE_FAST_MM")}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    if mkl_memory:
        env["MKL_DISABLE_FAST_MM"] = mkl_memory
    proc = subprocess.Popen([sys.executable, "-c", RESTARTED], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return out.splitlines(), proc.pid


@needs_mallinfo2
def test_the_restart_runs_the_command_once_more_in_the_same_process_with_the_tcache_off():
    lines, pid = run_restarted(None)
    assert lines == [
        "started None",  # the first start
        "started glibc.malloc.tcache_count=0",  # the same command again, tuned
        f"running {pid} glibc.malloc.tcache_count=0 taken back",  # in place (the launcher's pid), no tcache
        "MKL_DISABLE_FAST_MM 1",  # and MKL's memory manager off
    ]
    # glibc's default, set by the user: kept, and no restart; a value of MKL_DISABLE_FAST_MM is not overwritten
    lines, pid = run_restarted("glibc.malloc.tcache_count=7", mkl_memory="0")
    assert lines == [
        "started glibc.malloc.tcache_count=7",
        f"running {pid} glibc.malloc.tcache_count=7 freed blocks kept",
        "MKL_DISABLE_FAST_MM 0",
    ]
    lines, _ = run_restarted("glibc.malloc.tcache_count=7")  # no restart: MKL's manager is off all the same
    assert lines[-1] == "MKL_DISABLE_FAST_MM 1"


@pytest.mark.parametrize("command, restarts", [("pretrain", True), ("predict", True), ("ls", False), ("--help", False)])
def test_commands_that_run_a_model_restart_tuned(monkeypatch, command, restarts):
    calls = []
    monkeypatch.setattr(cli, "restart_tuned", lambda: calls.append(True))
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(sys, "argv", ["ptm", command])
    with pytest.raises(SystemExit):
        cli.run()
    assert calls == ([True] if restarts else [])


# Run in a fresh interpreter: 64 MB freed inside the heap stay resident while training keeps freed memory for its next
# step, and go back to the system when `release_freed_memory` is called.
RELEASED = """
import ctypes
from ptmcli.malloc import keep_freed_memory, release_freed_memory
def resident_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
before = resident_mb()
libc.free(block)
kept = resident_mb()
release_freed_memory()
print(round(before - kept), round(kept - resident_mb()))
"""


@needs_glibc
def test_memory_freed_in_the_heap_goes_back_to_the_system_when_released():
    freed, released = map(int, subprocess.check_output([sys.executable, "-c", RELEASED], text=True, timeout=60).split())
    assert freed < 8 and released > 56  # kept resident while freed, returned when released


def test_a_run_releases_freed_memory_when_its_steps_end_before_it_draws_curves(monkeypatch, tmp_path):
    """The curves (matplotlib, ~25 MB) come after the last step: drawn while the heap still holds the steps' memory,
    they added to the run's peak RSS."""
    import torch

    from ptmcli import loop
    from ptmcli.distributed import Dist
    from ptmcli.hardware import Hardware
    from ptmcli.schema import HardwareConfig, OptimizerConfig, TrainerConfig
    from tests.test_hardening import _Numbers, _Regression

    calls = []
    monkeypatch.setattr(loop, "release_freed_memory", lambda: calls.append("released"))
    monkeypatch.setattr(loop, "draw_curves", lambda *args: calls.append("curves"))
    job = loop.Job(torch.nn.Linear(4, 1), _Regression(1.0), _Numbers(), _Numbers(), {"family": "test"})
    trainer = TrainerConfig(max_steps=2, batch_size=4, eval_every=0, save_every=0, curves=True)
    hw = Hardware(torch.device("cpu"), torch.float32)
    loop.train(job, trainer, OptimizerConfig(), hw, Dist(), tmp_path, None, HardwareConfig())
    assert calls == ["released", "curves"]


def test_a_steps_loss_and_its_graph_are_freed_before_the_next_forward_pass(tmp_path):
    """Kept to the next step, the loss's autograd graph (thousands of small blocks on a real model) pins the heap
    between the blocks the step freed, which the next step's tensors of the same sizes then cannot use: T5's bench
    peak was ~95 MB higher (docs/results.md, stop 51)."""
    import weakref

    import torch

    from ptmcli import loop
    from ptmcli.distributed import Dist
    from ptmcli.hardware import Hardware
    from ptmcli.schema import OptimizerConfig, TrainerConfig
    from tests.test_hardening import _Numbers, _Regression

    class Watched(_Regression):
        def __init__(self):
            super().__init__(1.0)
            self.previous, self.alive = None, []

        def __call__(self, model, batch):
            training = torch.is_grad_enabled()  # evaluation builds no graph
            if training:
                self.alive.append(self.previous is not None and self.previous() is not None)
            sums, stats = super().__call__(model, batch)
            if training:
                self.previous = weakref.ref(sums["mse"])
            return sums, stats

    objective = Watched()
    job = loop.Job(torch.nn.Linear(4, 1), objective, _Numbers(), _Numbers(), {"family": "test"})
    trainer = TrainerConfig(max_steps=3, batch_size=4, grad_accum=2, eval_every=0, save_every=0, curves=False)
    loop.train(job, trainer, OptimizerConfig(), Hardware(torch.device("cpu"), torch.float32), Dist(), tmp_path, None)
    assert objective.alive == [False] * 6  # 3 steps of 2 micro-batches
