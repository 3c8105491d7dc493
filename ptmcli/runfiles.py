"""The files of a finished run directory (config.yaml, labels.json, tokenizer.json), read for `ptm evaluate`,
`predict`, `generate`, `export` and `init=`; a missing or damaged one is named in one sentence."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ptmcli.errors import PtmError
from ptmcli.files import read_json, read_yaml


def _file(run: Path, name: str, key: str) -> Path:
    if not run.exists():
        raise PtmError(f"{key}='{run}' does not exist; give the run directory a ptm command printed (run dir: ...).")
    if not run.is_dir():
        raise PtmError(f"{key}='{run}' is a file; give a run directory (the folder holding config.yaml).")
    path = run / name
    if not path.is_file():
        raise PtmError(f"{key}='{run}' is not a ptm run directory: it has no {name}.")
    return path


def config(run: Path, key: str = "run") -> dict:
    value = read_yaml(_file(run, "config.yaml", key), f"{key} config")
    if not isinstance(value, dict):
        raise PtmError(f"{key}='{run}': config.yaml is damaged (it holds no mapping of settings).")
    return value


def labels(run: Path, key: str = "run", multi: bool = False) -> list[str] | dict[str, list[str]]:
    """The run's label names; a multi-task run's by task."""
    value = read_json(_file(run, "labels.json", key), f"{key} labels")
    if multi and isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        return value
    if multi or not isinstance(value, list):
        expected = "a mapping of task names to label lists" if multi else "a list of label names"
        raise PtmError(f"{key}='{run}': labels.json is damaged (it should hold {expected}).")
    return value


def tokenizer(run: Path, key: str = "run") -> Tokenizer:
    path = _file(run, "tokenizer.json", key)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises plain Exceptions with its parser's text
        raise PtmError(f"{key}='{run}': tokenizer.json is damaged and cannot be read ({err}).") from err


def is_pretraining(raw: dict) -> bool:
    return "objective" in raw
