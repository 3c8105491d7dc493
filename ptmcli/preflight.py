"""Checks of the paths a checked config names, run before anything heavy is imported: a missing data file,
tokenizer, init or resume target is reported in a second, not after torch and datasets have loaded. The
commands check the same things again, more deeply, when they read them. No torch here."""

from __future__ import annotations

from pathlib import Path

from ptmcli.errors import PtmError
from ptmcli.files import package_path
from ptmcli.schema import FinetuneConfig, PretrainConfig


def local_path(spec: str, key: str) -> Path | None:
    """The local file or folder `spec` names (pkg:// resolved), None for hub names; refused if it is missing."""
    if spec.startswith("hf:"):
        return None  # fetched when the command runs (online only)
    path = package_path(spec, key) if spec.startswith("pkg://") else Path(spec).expanduser()
    if not path.exists():
        raise PtmError(f"{key}='{spec}' does not exist. Check the path (pkg://package/path for files in a package).")
    return path


def check_paths(cfg: PretrainConfig | FinetuneConfig) -> list[str]:
    """Refuse a named path that is missing; returns 'key: path' for each one that was found."""
    # a resumed run has what init gave it in its checkpoint and run directory; init may have moved since
    named = {"init": cfg.init if cfg.resume is None else None}
    if isinstance(cfg, PretrainConfig):
        if cfg.data.tokens:  # the token directory replaces the source
            named["data.tokens"] = cfg.data.tokens
        elif not cfg.data.source.startswith("task:"):  # a task name is resolved against conf/task/ by the loader
            named["data.source"] = cfg.data.source
        # with init= (or on resume) the tokenizer is init's own, and the run checks data.tokenizer against it
        named["data.tokenizer"] = cfg.data.tokenizer if cfg.init is None and cfg.resume is None else None
    else:
        named.update({f"data.{s}": getattr(cfg.data, s) for s in ("train", "validation", "test")})
        named["tokenizer"] = cfg.tokenizer
    if cfg.resume not in (None, "auto"):
        named["resume"] = cfg.resume
    found = []
    for key, spec in named.items():
        if spec and (path := local_path(spec, key)) is not None:
            found.append(f"{key}: {path}")
    return found
