"""Run directories: who may write one, what a run writes at start, and which checkpoint `resume=` continues from."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from ptmcli import checkpoint
from ptmcli.distributed import Dist, broadcast_str
from ptmcli.errors import PtmError
from ptmcli.files import write_whole
from ptmcli.runlog import console


def config_hash(cfg: dict) -> str:
    """Identity of a run's settings: everything but `resume` (which says how to start, not what to train)."""
    body = {k: v for k, v in cfg.items() if k != "resume"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run directory -> descriptor of its locked lock file, for this process's run
_started: set[Path] = set()  # run directories this process recorded a start in (every check had passed)
_made: set[Path] = set()  # `<stamp>-N` directories this process made (release removes them if left empty)


def _lock(run_dir: Path) -> str | None:
    """Take the run directory's exclusive lock for this process; None, or who holds it. The kernel's flock is the
    lock, so a crashed (even SIGKILLed) holder releases it; the file's pid and host only name the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            return holder or "{}"
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its holder removed the file between our open and flock: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
    _held[run_dir.resolve()] = fd
    return None


def release() -> None:
    """Give up the run directory locks this process holds (the kernel would on exit; a test runs many runs)."""
    for run_dir in list(_held):
        release_one(run_dir)


def release_one(run_dir: Path) -> None:
    run_dir = run_dir.resolve()
    (run_dir / LOCK_FILE).unlink(missing_ok=True)  # while still locked, so no one else locks the old file
    os.close(_held.pop(run_dir))
    _started.discard(run_dir)
    if run_dir in _made:
        _made.discard(run_dir)
        try:
            run_dir.rmdir()  # only if the run wrote nothing into it
        except OSError:
            pass


def lock_holder(run_dir: Path) -> dict | None:
    """Who holds `run_dir`'s lock now ({pid, host, since}), or None when no live process does. Takes nothing."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return json.loads(os.read(fd, 4096) or b"{}")
        except ValueError:
            return {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def mark_ended(status: str) -> None:
    """Record in run.json how this process's run ended (completed, interrupted or failed); `ptm runs` reads it. A
    run that records nothing and holds no lock was killed."""
    for run_dir in _held:
        if run_dir not in _started:  # refused before it started: the directory stays exactly as it was
            continue
        info = _run_info(run_dir)
        if info:
            info["ended"] = {"status": status, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
            write_whole(run_dir / "run.json", json.dumps(info, indent=1) + "\n", "run")


def lock(run_dir: Path, dist: Dist) -> None:
    """Hold `run_dir` for this run (rank 0 holds it for all processes of a torchrun job) or stop with exit 2."""
    holder = _lock(run_dir) if dist.is_main else None
    holder = broadcast_str(holder or "") if dist.world_size > 1 else holder
    if holder:
        try:
            who = json.loads(holder)
            named = f"process {who['pid']} on {who['host']}"
        except (ValueError, KeyError, TypeError):
            named = "another process"
        raise PtmError(
            f"The run directory '{run_dir}' is in use by {named} (lock file {run_dir / LOCK_FILE}). Two runs in "
            f"one directory would overwrite each other's checkpoints and metrics: wait for it to finish, stop it, "
            f"or pick another hydra.run.dir; nothing was changed."
        )


def _claim_stamped(run_dir: Path, dist: Dist) -> Path:
    """Lock the stamped directory Hydra made for a fresh run; when a run started in the same second already has it
    (seeds launched together), lock the first free `<stamp>-N` beside it instead, so each run gets its own."""
    claimed = ""
    if dist.is_main:
        for n in range(1, 1000):
            candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
            made = not candidate.exists()
            if _lock(candidate) is not None:
                continue
            if _run_info(candidate):  # a run that started and ended within the same second
                release_one(candidate)
                continue
            if made:
                _made.add(candidate.resolve())
            claimed = str(candidate)
            break
        else:
            raise PtmError(f"No free run directory beside '{run_dir}' (tried 999): pick one with hydra.run.dir=DIR.")
    return Path(broadcast_str(claimed) if dist.world_size > 1 else claimed)


def _empty_or_hydra_only(run_dir: Path) -> bool:
    return all(p.name in (".hydra", LOCK_FILE) for p in run_dir.iterdir())


def run_of(resume: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint folder or the one checkpoint) named by resume=PATH: a checkpoint, a checkpoints/
    folder or a run directory."""
    path = Path(resume).expanduser()
    if (path / checkpoint.MARKER).exists():
        return path.parent.parent, path
    for root, run in ((path / "checkpoints", path), (path, path.parent)):
        if checkpoint.latest(root) is not None:
            return run, root
    raise PtmError(
        f"resume='{resume}' holds no complete checkpoint (looked for {path}/checkpoints/step-N with a "
        f"{checkpoint.MARKER} marker). Point resume= at a run directory or checkpoint, or use resume=auto."
    )


def _newest_intact(root: Path, asked: str) -> Path:
    """The newest checkpoint under `root` that verifies, saying which newer ones were skipped and why."""
    skipped: list[str] = []
    found = checkpoint.newest_intact(root, skipped)
    if skipped:
        console.print(f"[yellow]{asked}: skipped damaged checkpoint(s) {'; '.join(skipped)}[/]")
    if found is None:
        raise PtmError(
            f"{asked}: every checkpoint under '{root}' is damaged ({'; '.join(skipped)}). Restore one from a copy, or "
            f"start a fresh run in another hydra.run.dir."
        )
    return found


def _earlier_run(run_dir: Path, digest: str) -> tuple[Path, Path] | None:
    """(checkpoint, run directory) of the newest sibling run with this config that has a checkpoint."""
    if not run_dir.parent.is_dir():
        return None
    earlier = [
        (found, d)
        for d in run_dir.parent.iterdir()
        if d.is_dir() and d != run_dir and _run_info(d).get("config_hash") == digest
        if (found := checkpoint.latest(d / "checkpoints")) is not None
    ]
    return max(earlier, key=lambda cd: (cd[0] / checkpoint.MARKER).stat().st_mtime) if earlier else None


def prepare(
    run_dir: Path, cfg: dict, command: str, recipe: str, dist: Dist, named: bool = False
) -> tuple[Path, Path | None]:
    """Decide where this run writes and what it resumes from, and lock that directory; nothing else is written.
    `named`: the user named the directory (hydra.run.dir), so resume=auto continues it or starts fresh in it and
    never looks for an earlier run elsewhere. Returns (run_dir, checkpoint)."""
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        run_dir, named_checkpoint = run_of(resume)
    elif resume == "auto" and not named and checkpoint.latest(run_dir / "checkpoints") is None:
        earlier = _earlier_run(run_dir, config_hash(cfg))
        if earlier is not None:
            if dist.is_main and run_dir.exists() and _empty_or_hydra_only(run_dir):
                shutil.rmtree(run_dir)  # the fresh, still empty directory Hydra made for this invocation
            run_dir = earlier[1]
    if resume is None and not named:
        run_dir = _claim_stamped(run_dir, dist)
    else:
        lock(run_dir, dist)  # before looking at its checkpoints, so that two runs cannot both pass the checks below
    existing = checkpoint.latest(run_dir / "checkpoints")
    if resume is None and existing is not None:
        raise PtmError(
            f"The run directory '{run_dir}' already holds checkpoints (latest {existing.name}). Add resume=auto to "
            f"continue it, or pick a new hydra.run.dir; nothing was changed."
        )
    resume_from = None
    if resume not in (None, "auto"):
        resume_from = (
            checkpoint.verified(named_checkpoint)
            if (named_checkpoint / checkpoint.MARKER).exists()
            else _newest_intact(named_checkpoint, f"resume={resume}")
        )
    elif resume == "auto" and existing is not None:
        resume_from = _newest_intact(run_dir / "checkpoints", "resume=auto")
    elif resume == "auto" and dist.is_main:
        which = "the named run directory" if named else f"no earlier {command} run of '{recipe}' with this config"
        console.print(f"resume=auto: {which} has no checkpoint yet; starting fresh in {run_dir}.")
    if dist.is_main and resume_from is not None:
        console.print(f"Resuming {run_dir} from {resume_from.name}.")
    return run_dir, resume_from


def record(
    run_dir: Path,
    cfg: dict,
    command: str,
    recipe: str,
    dist: Dist,
    extra: dict | None = None,
    in_force: dict | None = None,
    fresh: bool = True,
    hydra_files: dict[str, str] | None = None,
) -> None:
    """Write the run's identity and the config in force. Called once every input has been checked, so that a
    run that fails at start leaves an existing run directory exactly as it was. `in_force` is the config as the
    run resolved it (e.g. the architecture a Hugging Face init brings), when it differs from the composed `cfg`
    whose hash identifies the run. A `fresh` run (not a resume) writes a new identity. `hydra_files`: Hydra's
    record of the invocation (.hydra/NAME -> text), which Hydra itself is told not to write before the checks."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (hydra_files or {}).items():
            (run_dir / ".hydra").mkdir(exist_ok=True)
            write_whole(run_dir / ".hydra" / name, text, "run")
        info = (not fresh and _run_info(run_dir)) or {
            "command": command,
            "recipe": recipe,
            "config_hash": config_hash(cfg),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        info.update(extra or {})
        info.pop("ended", None)  # a resumed run is going again
        _started.add(run_dir.resolve())
        write_whole(run_dir / "run.json", json.dumps(info, indent=1) + "\n", "run")
        write_whole(run_dir / "config.yaml", yaml.safe_dump(in_force or cfg, sort_keys=False), "run")
    dist.barrier()
