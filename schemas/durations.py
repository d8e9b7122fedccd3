"""Human durations (``30s``, ``10m``, ``8h``, ``30d``) as used by the CLI and the settings."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


class _TooLong(ValueError):
    pass


def _seconds(seconds: float, text: object) -> timedelta:
    """``timedelta(seconds=...)``, with ValueError (not OverflowError) when out of range."""
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise _TooLong(f"{text!r} is too long a duration") from None


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m``, ``45s``, ``7d`` or a bare number of seconds.

    Raises:
        ValueError: the text is not a duration.
    """
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError("empty duration")
    try:
        return _seconds(float(cleaned), text)
    except _TooLong:
        raise
    except ValueError:
        pass
    seconds = 0.0
    position = 0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned):
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 10m, 8h, 7d)")
    return _seconds(seconds, text)


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling of ``value`` in the units above (``90s`` -> ``90s``)."""
    seconds = value.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _coerce(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _seconds(value, value)
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
"""A ``timedelta`` that also accepts ``"30s"``-style text and seconds."""
