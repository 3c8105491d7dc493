"""Start `ptm` runs for the tests by forking a process that has imported torch, datasets and ptm once.

A fresh interpreter spends ~5 s importing torch, torch._dynamo (which torch's optimizers import on first use),
datasets, hydra and ptm before a tiny run's first step, and the suite starts about a hundred such runs. Forking a
process that has done those imports and nothing else gives each run its own process -- its own exit status,
signals, environment, working directory, output files and exit handlers, as `python -m ptmcli` would -- without
the imports. The server runs no torch operation before forking, so no thread pool is copied into a child, and it
refuses to serve if any import started a thread.

A request the server cannot serve as a fresh interpreter would -- an environment that differs in anything but the
variables ptm reads when a run starts -- gets None, and the caller starts a real interpreter instead. Tests of the
installed command itself (a wheel on another PYTHONPATH, torchrun, two runs racing) start real interpreters."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

# Read by ptm or by the shell completion when a command runs, not when a module is imported: a child may differ in
# these from the server. Anything else in the environment may have been read at import (datasets' cache and
# offline switches, OpenMP's thread count), so a request that differs there gets a real interpreter.
RUN_TIME_VARIABLES = ("PTM_RUN_STAMP", "COMP_LINE", "COMP_POINT")
PRELOAD = (
    "torch",
    "torch._dynamo",
    "datasets",
    "hydra",
    "omegaconf",
    "ptmcli.cli",
    "ptmcli.pretrain",
    "ptmcli.finetune",
)


def _become(request: dict, channels: tuple) -> None:
    """In the forked child: take on the request's process state, run ptm, and leave the interpreter the way
    `python -m ptmcli` does (SystemExit), so that exit handlers and non-daemon threads are waited for."""
    for channel in channels:  # the child's copies; the server's stay open
        channel.close()
    os.chdir(request["cwd"])
    for name in RUN_TIME_VARIABLES:  # the rest equals the server's (ForkServer.start checked), imports' own included
        os.environ.pop(name, None)
        if name in request["env"]:
            os.environ[name] = request["env"][name]
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import ptmcli
    from ptmcli.cli import main

    sys.argv = [str(Path(ptmcli.__file__).with_name("__main__.py")), *request["args"]]
    main()
    sys.exit(0)


def serve() -> None:
    """The server: one JSON request per line on stdin; for each, the child's pid and then its exit status (as
    subprocess reports it: negative for a signal) as JSON lines on the original stdout."""
    import importlib
    import threading

    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # a stray print in the server must not land in the replies
    for module in PRELOAD:
        importlib.import_module(module)
    ready = threading.active_count() == 1
    replies.write(json.dumps({"ready": ready}) + "\n")
    replies.flush()
    if not ready:
        return
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become(request, (requests, replies))
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class Replies:
    """The server's reply lines, read from the pipe without a buffer that select() cannot see into."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, b""

    def next(self, timeout: float | None) -> dict | None:
        """The next reply, or None if none came within `timeout` seconds."""
        while b"\n" not in self.pending:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise RuntimeError("the fork server of the tests stopped")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)


class Child:
    """One forked run: `pid`, `poll()`, `wait()` and `send_signal()` as subprocess.Popen has them."""

    def __init__(self, replies: Replies, pid: int):
        self.replies, self.pid, self.returncode = replies, pid, None

    def poll(self) -> int | None:
        return self.wait(timeout=0, kill=False) if self.returncode is None else self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None, kill: bool = True) -> int | None:
        if self.returncode is None:
            reply = self.replies.next(timeout)
            if reply is None and kill:
                os.kill(self.pid, signal.SIGKILL)
                self.replies.next(None)
                raise subprocess.TimeoutExpired(["ptm", str(self.pid)], timeout)
            self.returncode = None if reply is None else reply["status"]
        return self.returncode


class ForkServer:
    def __init__(self):
        self.server: subprocess.Popen | None = None
        self.replies: Replies | None = None
        self.env: dict | None = None
        self.broken = False

    def _started(self, env: dict) -> subprocess.Popen | None:
        if self.server is None and not self.broken:
            root = Path(__file__).resolve().parents[1]
            self.server = subprocess.Popen(
                [sys.executable, "-c", "from tests.forkserver import serve; serve()"],
                env=env,
                cwd=root,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
            )
            self.replies = Replies(self.server.stdout.fileno())
            try:
                hello = self.replies.next(timeout=300)
            except RuntimeError:
                hello = None
            if not (hello or {}).get("ready"):
                self.server.kill()
                self.broken, self.server = True, None
                return None
            self.env = dict(env)
            atexit.register(self.server.stdin.close)  # the server leaves its loop at end of input
        return self.server

    def start(self, args: list[str], env: dict, cwd: Path | None, stdout: Path, stderr: Path) -> Child | None:
        """Fork a `ptm ARGS` run, or None where only a fresh interpreter would do."""
        if os.environ.get("PTM_TEST_FORK") == "0":  # to debug a test in a fresh interpreter
            return None
        # the server imports ptm from this checkout: a run asking for another one (an installed wheel) gets its own
        # interpreter, and does not become the server's environment by coming first
        if env.get("PYTHONPATH") != os.environ.get("PYTHONPATH"):
            return None
        server = self._started(env)
        if server is None or server.poll() is not None or not self._same(env):
            return None
        run_time = {k: env[k] for k in RUN_TIME_VARIABLES if k in env}
        request = {
            "args": args,
            "env": run_time,
            "cwd": str(cwd or Path.cwd()),
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        server.stdin.write((json.dumps(request) + "\n").encode())
        return Child(self.replies, self.replies.next(timeout=60)["pid"])

    def _same(self, env: dict) -> bool:
        def settled(variables: dict) -> dict:
            return {k: v for k, v in variables.items() if k not in RUN_TIME_VARIABLES}

        return settled(env) == settled(self.env)


FORKS = ForkServer()
