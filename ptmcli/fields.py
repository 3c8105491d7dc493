"""Dataclass fields that carry their own help text (what `ptm ... --help` prints)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def described(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
