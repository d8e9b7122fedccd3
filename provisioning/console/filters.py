"""The event filters of the console's query string: the CLI's filters, the same rules.

``device``, ``type``, ``outcome``, ``reason``, ``peer``, ``since`` and ``until`` (a duration
ago such as ``10m``, or an ISO 8601 time, UTC when no offset is given), as in
``devicegate audit``. Empty fields mean "any".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from provisioning.audit.query import EventFilter
from provisioning.errors import RequestInvalid
from provisioning.http.api import parse_time
from schemas.events import EventType, Outcome, Reason

NAMES = ("device", "type", "outcome", "reason", "peer", "since", "until")


class FilterInvalid(RequestInvalid):
    """A filter field that does not validate; ``field`` names it, so the page can show the
    message beside that field (``limit`` and ``cursor`` are fields too)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _text(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name, "").strip()
    if len(value) > 512:
        raise FilterInvalid(name, f"{name} is too long (at most 512 characters)")
    return value or None


def _time(query: Mapping[str, str], name: str, now: datetime) -> datetime | None:
    text = _text(query, name)
    if text is None:
        return None
    try:
        return parse_time(text, now=now)
    except RequestInvalid as exc:
        raise FilterInvalid(name, str(exc)) from None


def _member(
    query: Mapping[str, str], name: str, enum: type[EventType | Outcome | Reason]
) -> str | None:
    value = _text(query, name)
    if value is not None and value not in {member.value for member in enum}:
        raise FilterInvalid(name, f"unknown {name} {value!r}")
    return value


def parse(query: Mapping[str, str], *, now: datetime) -> EventFilter:
    """Raises: FilterInvalid: an unknown type, outcome or reason, a bad time, too long."""
    return EventFilter(
        device_id=_text(query, "device"),
        since=_time(query, "since", now),
        until=_time(query, "until", now),
        type=_member(query, "type", EventType),
        outcome=_member(query, "outcome", Outcome),
        reason=_member(query, "reason", Reason),
        peer=_text(query, "peer"),
    )


def echo(query: Mapping[str, str]) -> dict[str, str]:
    """The filter fields as given, to carry into links (pages, export, live)."""
    return {name: query[name].strip() for name in NAMES if query.get(name, "").strip()}
