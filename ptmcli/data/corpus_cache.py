"""A `data.source` run's packed corpus, kept in ptm's cache as a token directory (see token_dir), so that the next
run with the same data settings trains from it: nothing read, tokenized or packed, and datasets (with pandas and
pyarrow, ~100 MB of the process's memory and 0.6 s of its start) never loaded.

The key is everything the packed sequences depend on: the data settings, the objective and its packing layout,
the content of a tokenizer given by init= or data.tokenizer, and each source file's path, size and modification
time (a changed, added or removed file is a new key). Sources that cannot be keyed that cheaply (`hf:` datasets,
`task:` corpora) are not kept: datasets' own cache serves them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from ptmcli.data import token_dir
from ptmcli.data.tokenizer import load_tokenizer, tokenizer_digest
from ptmcli.errors import PtmError
from ptmcli.files import cache_root, package_path
from ptmcli.schema import DataConfig

VERSION = 1  # of the key and of what is kept: raise it when packing changes what a setting gives
RUN_ONLY = ("tokens", "num_proc", "keep_corpus")  # how a run gets its packed corpus, not what the corpus is
UNKEYED = ("name", *RUN_ONLY)  # settings that change nothing in the packed sequences


def source_files(cfg: DataConfig) -> list[Path] | None:
    """The files data.source reads (every file under a directory, hidden ones too: a key too strict only costs a
    preparation), or None when the source is not a local file or directory."""
    if cfg.source.startswith(("hf:", "task:")):
        return None
    path = package_path(cfg.source) if cfg.source.startswith("pkg://") else Path(cfg.source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return None  # missing: preparing says so, in its own words


def directory(cfg: DataConfig, objective: str, layout: str, tokenizer: Tokenizer | None) -> Path | None:
    """Where the corpus these settings give is kept (whether or not it is there yet); None when it is not kept. The
    objective is part of the key because a tokenizer trained for a masking objective has a mask token."""
    files = source_files(cfg)
    if files is None:
        return None
    if tokenizer is None and cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.lowercase)
    key = {
        "version": VERSION,
        "data": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in UNKEYED},
        "objective": objective,
        "layout": layout,
        "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "files": [[str(p.resolve()), s.st_size, s.st_mtime_ns] for p, s in ((p, p.stat()) for p in files)],
    }
    return cache_root() / "corpora" / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def keep(
    target: Path, tokenizer: Tokenizer, chunks: dict, documents: dict, layout: str, max_seq_len: int, fingerprint: str
) -> None:
    """Write the prepared corpus to `target`. Keeping it only saves the next run's preparation, so a failure (a
    full disk, another process that kept the same corpus first) leaves nothing behind and stops nothing."""
    try:
        token_dir.write(target, tokenizer, chunks, documents, layout, max_seq_len, {"fingerprint": fingerprint})
    except (OSError, PtmError):
        pass  # token_dir.write removes its temporary directory; a complete one another process wrote stays


def discard(target: Path) -> None:
    """Remove a kept corpus that cannot be read (damaged by hand or by a full disk): the run prepares it again."""
    shutil.rmtree(target, ignore_errors=True)
