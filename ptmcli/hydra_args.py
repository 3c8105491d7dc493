"""Which of Hydra's flags and `hydra.*` overrides ptm passes on: an allow-list, because several run code.

`--experimental-rerun FILE` unpickles FILE; `hydra.callbacks.*._target_` instantiates any callable;
`hydra.job_logging` reaches `logging.config.dictConfig`, whose `()` key calls any factory; and
`--config-dir`/`hydra.searchpath` would let a stranger's folder supply those. Anything not listed here is
refused before Hydra sees it.
"""

from __future__ import annotations

from ptmcli.errors import PtmError

# flag -> the values it may take (None: it takes no value)
ALLOWED_FLAGS: dict[str, frozenset[str] | None] = {
    "-m": None,
    "--multirun": None,
    "-r": None,
    "--run": None,
    "-c": frozenset({"job", "hydra", "all"}),
    "--cfg": frozenset({"job", "hydra", "all"}),
    "-p": None,  # --cfg's package filter; its value is a config path, read only
    "--package": None,
    "--resolve": None,
    "-i": None,
    "--info": None,
    "--hydra-help": None,
    "--version": None,
    "-sc": None,
    "--shell-completion": None,
}
# flags whose next argument is their value, not an override (--info takes one only from its choices)
FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package"}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# Hydra keys a user may set: where runs and sweeps are written
ALLOWED_HYDRA_KEYS = {"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"}
# Hydra group choices a user may make: Hydra's own sweeper and launcher (plugins add theirs by package)
ALLOWED_HYDRA_GROUPS = {"hydra/sweeper", "hydra/launcher"}
SAFE_USE = (
    "ptm passes on only the Hydra keys "
    f"{', '.join(sorted(ALLOWED_HYDRA_KEYS))}, {'=NAME, '.join(sorted(ALLOWED_HYDRA_GROUPS))}=NAME "
    "and the Hydra flags -m, --cfg job|hydra|all, --resolve, --package, --info, --shell-completion, "
    "--hydra-help and --version, since others load files or code"
)


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, Hydra flags with their values), wherever on the line the flags were; unknown flags refused."""
    overrides, flags = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            overrides.append(arg)
            i += 1
            continue
        if arg not in ALLOWED_FLAGS:
            raise PtmError(f"The flag '{arg}' is refused: {SAFE_USE}.")
        flags.append(arg)
        takes_value = arg in FLAGS_WITH_VALUE or (
            arg in ("-i", "--info") and i + 1 < len(args) and args[i + 1] in INFO_CHOICES
        )
        if takes_value and i + 1 < len(args):
            value = args[i + 1]
            choices = ALLOWED_FLAGS[arg]
            if choices is not None and value not in choices:
                raise PtmError(f"{arg} {value}: use {arg} {' | '.join(sorted(choices))}.")
            flags.append(value)
            i += 1
        i += 1
    return overrides, flags


def check_hydra_override(arg: str) -> None:
    """Refuse an override that reaches Hydra's own config beyond the allow-list."""
    key = arg.lstrip("+~").partition("=")[0]  # without Hydra's +, ++ and ~ prefixes
    if not key.startswith(("hydra.", "hydra/")) and key != "hydra":
        return
    if key in ALLOWED_HYDRA_GROUPS and not arg.startswith(("+", "~")):
        return
    if key in ALLOWED_HYDRA_KEYS and not arg.startswith("~"):
        return
    raise PtmError(f"The override '{arg}' is refused: {SAFE_USE}.")
