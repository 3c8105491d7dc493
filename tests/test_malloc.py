"""glibc's malloc set up for training: `ptm`'s model commands start again with the tcache off, a user's own
GLIBC_TUNABLES setting wins, and nothing changes without glibc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ptmcli import cli, malloc

needs_glibc = pytest.mark.skipif(not malloc.glibc(), reason="glibc's malloc only")


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


@needs_glibc
def test_the_restart_runs_the_command_once_more_in_the_same_process_with_the_tcache_off():
    script = (
        "import os, sys; sys.argv = ['ptm', 'pretrain']; from ptmcli.malloc import restart_tuned; "
        "print('started', os.environ.get('GLIBC_TUNABLES'), flush=True); restart_tuned(); "
        "print('running', os.getpid(), os.environ['GLIBC_TUNABLES'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.splitlines() == [
        "started None",  # the first start
        "started glibc.malloc.tcache_count=0",  # the same command again, tuned
        f"running {proc.pid} glibc.malloc.tcache_count=0",  # in place: the launcher's pid still runs it
    ]


@pytest.mark.parametrize("command, restarts", [("pretrain", True), ("predict", True), ("ls", False), ("--help", False)])
def test_commands_that_run_a_model_restart_tuned(monkeypatch, capsys, command, restarts):
    calls = []
    monkeypatch.setattr(cli, "restart_tuned", lambda: calls.append(True))
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(sys, "argv", ["ptm", command])
    with pytest.raises(SystemExit):
        cli.run()
    assert calls == ([True] if restarts else [])
