"""Write JSON-like data as TOML (``policy export --format toml``): what ``tomllib`` reads
back is the same data, with ``None`` values left out (TOML has no null; the models these
documents come from default them to ``None``).

Tables and arrays of tables get headers; scalars and lists of scalars are written inline;
strings are written as TOML basic strings (JSON's escapes are TOML's).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("TOML export of a NaN or infinite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + (f" {inner} " if inner else "") + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(item, Mapping) for item in value)
    )


def _table(data: Mapping[str, Any], path: tuple[str, ...], out: list[str]) -> None:
    for key, value in data.items():
        if value is None or isinstance(value, Mapping) or _is_table_array(value):
            continue
        out.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            where = (*path, _key(key))
            out.append("")
            out.append(f"[{'.'.join(where)}]")
            _table(value, where, out)
        elif _is_table_array(value):
            where = (*path, _key(key))
            for item in value:
                out.append("")
                out.append(f"[[{'.'.join(where)}]]")
                _table(item, where, out)


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as a TOML document."""
    out: list[str] = []
    _table(data, (), out)
    return "\n".join(out).strip("\n") + "\n"
