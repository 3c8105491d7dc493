"""Run directories: what a run writes at start, and which checkpoint `resume=` continues from."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import yaml

from ptmcli import checkpoint
from ptmcli.distributed import Dist
from ptmcli.errors import PtmError
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


def _only_hydra_files(run_dir: Path) -> bool:
    return all(p.name == ".hydra" for p in run_dir.iterdir())


def _from_path(resume: str) -> tuple[Path, Path]:
    """(run directory, checkpoint) named by resume=PATH: a checkpoint, a checkpoints/ folder or a run directory."""
    path = Path(resume).expanduser()
    if (path / checkpoint.MARKER).exists():
        return path.parent.parent, path
    for root, run in ((path / "checkpoints", path), (path, path.parent)):
        found = checkpoint.latest(root)
        if found is not None:
            return run, found
    raise PtmError(
        f"resume='{resume}' holds no complete checkpoint (looked for {path}/checkpoints/step-N with a "
        f"{checkpoint.MARKER} marker). Point resume= at a run directory or checkpoint, or use resume=auto."
    )


def prepare(run_dir: Path, cfg: dict, command: str, recipe: str, dist: Dist) -> tuple[Path, Path | None]:
    """Decide where this run writes and what it resumes from, writing nothing. Returns (run_dir, checkpoint)."""
    resume, digest = cfg.get("resume"), config_hash(cfg)
    existing = checkpoint.latest(run_dir / "checkpoints")
    resume_from = None
    if resume is None and existing is not None:
        raise PtmError(
            f"The run directory '{run_dir}' already holds checkpoints (latest {existing.name}). Add resume=auto to "
            f"continue it, or pick a new hydra.run.dir; nothing was changed."
        )
    if resume == "auto":
        if existing is not None:
            resume_from = existing
        else:
            earlier = (
                [
                    (checkpoint.latest(d / "checkpoints"), d)
                    for d in run_dir.parent.iterdir()
                    if d.is_dir() and d != run_dir and _run_info(d).get("config_hash") == digest
                ]
                if run_dir.parent.is_dir()
                else []
            )
            earlier = [(c, d) for c, d in earlier if c is not None]
            if earlier:
                resume_from, older = max(earlier, key=lambda cd: (cd[0] / checkpoint.MARKER).stat().st_mtime)
                if dist.is_main and run_dir.exists() and _only_hydra_files(run_dir):
                    shutil.rmtree(run_dir)  # the fresh, still empty directory Hydra made for this invocation
                run_dir = older
            elif dist.is_main:
                console.print(
                    f"resume=auto: no earlier {command} run of '{recipe}' with this config has a checkpoint; "
                    f"starting fresh in {run_dir}."
                )
    elif resume is not None:
        run_dir, resume_from = _from_path(resume)
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
) -> None:
    """Write the run's identity and the config in force. Called once every input has been checked, so that a
    run that fails at start leaves an existing run directory exactly as it was. `in_force` is the config as the
    run resolved it (e.g. the architecture a Hugging Face init brings), when it differs from the composed `cfg`
    whose hash identifies the run."""
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        info = _run_info(run_dir) or {
            "command": command,
            "recipe": recipe,
            "config_hash": config_hash(cfg),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        info.update(extra or {})
        (run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
        (run_dir / "config.yaml").write_text(yaml.safe_dump(in_force or cfg, sort_keys=False))
    dist.barrier()
