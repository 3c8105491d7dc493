"""Plain config values (from YAML and the command line) into typed dataclass sections: unknown keys, wrong types
and values out of range fail with one sentence naming the key, and a close match when there is one. No torch."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from ptmcli.errors import PtmError
from ptmcli.ranges import check_ranges


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise PtmError naming `key`."""
    origin = typing.get_origin(tp)
    bad = PtmError(f"{key}={value!r} is not valid: expected {_type_name(tp)}.")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise PtmError(
                f"{key}={value!r} is not a valid choice; valid: {', '.join(map(str, choices))}."
                + did_you_mean(str(value), map(str, choices))
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 on a command line is YAML's float 1000.0
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise PtmError(f"{key}={value!r} is not a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    return value


def check_section(name: str, values: Any, schema: type) -> Any:
    """Build `schema` from a plain dict, failing on unknown keys, wrong types and values out of range."""
    if not isinstance(values, dict):
        raise PtmError(f"'{name}' must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise PtmError(
                f"Unknown key '{name}.{key}'.{did_you_mean(str(key), fields)} "
                f"Valid keys of '{name}': {', '.join(fields)}."
            )
        kwargs[key] = coerce(value, hints[key], f"{name}.{key}")
    built = schema(**kwargs)
    check_ranges(name, built)
    return built
