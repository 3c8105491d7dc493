"""Where the shipped configs live: conf/ (config groups, task files) and recipes/ (whole presets)."""

from __future__ import annotations

from pathlib import Path

from ptmcli.errors import PtmError


def config_dirs() -> tuple[Path, Path]:
    """(conf, recipes): inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for root in (here, here.parent):
        if (root / "conf").is_dir() and (root / "recipes").is_dir():
            return root / "conf", root / "recipes"
    raise PtmError(f"Cannot find the conf/ and recipes/ folders next to {here}; reinstall ptm.")
