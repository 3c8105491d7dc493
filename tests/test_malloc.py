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
"""


def run_restarted(tunables: str | None) -> tuple[list[str], int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
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
    ]
    lines, pid = run_restarted("glibc.malloc.tcache_count=7")  # glibc's default, set by the user: kept, no restart
    assert lines == [
        "started glibc.malloc.tcache_count=7",
        f"running {pid} glibc.malloc.tcache_count=7 freed blocks kept",
    ]


@pytest.mark.parametrize("command, restarts", [("pretrain", True), ("predict", True), ("ls", False), ("--help", False)])
def test_commands_that_run_a_model_restart_tuned(monkeypatch, command, restarts):
    calls = []
    monkeypatch.setattr(cli, "restart_tuned", lambda: calls.append(True))
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(sys, "argv", ["ptm", command])
    with pytest.raises(SystemExit):
        cli.run()
    assert calls == ([True] if restarts else [])
