"""Reading the auth event log: filters and an opaque cursor over ``(time, id)`` descending.

Shared by ``GET /v1/events`` and ``devicegate audit``. The cursor is the base64url JSON of
the last returned row's ``(time, id)``; the next page starts strictly after it, so pages
neither skip nor repeat rows even when many events share a timestamp.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from provisioning.errors import RequestInvalid
from schemas.events import AuthEvent

MAX_LIMIT = 1000

_COLUMNS = (
    "id, time, instance, type, outcome, reason, device_id, fleet, cert_serial, "
    "cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail, chain_id, "
    "seq, prev_hash, hash"
)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events to return; every field is optional and they combine with AND.

    ``peer`` matches the address exactly, or its host part when stored as ``host:port``.
    """

    device_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    type: str | None = None
    outcome: str | None = None
    reason: str | None = None
    peer: str | None = None


def encode_cursor(time: datetime, event_id: uuid.UUID) -> str:
    raw = json.dumps([time.isoformat(), str(event_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Raises: RequestInvalid: not a cursor this module made."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        time_text, id_text = json.loads(raw)
        time = datetime.fromisoformat(time_text)
        if time.tzinfo is None:
            raise ValueError("naive time")
        return time, uuid.UUID(id_text)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise RequestInvalid("invalid cursor") from None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(filters: EventFilter, cursor: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if filters.device_id is not None:
        clauses.append(f"device_id = {arg(filters.device_id)}")
    if filters.since is not None:
        clauses.append(f"time >= {arg(filters.since)}")
    if filters.until is not None:
        clauses.append(f"time < {arg(filters.until)}")
    if filters.type is not None:
        clauses.append(f"type = {arg(str(filters.type))}")
    if filters.outcome is not None:
        clauses.append(f"outcome = {arg(str(filters.outcome))}")
    if filters.reason is not None:
        clauses.append(f"reason = {arg(str(filters.reason))}")
    if filters.peer is not None:
        exact = arg(filters.peer)
        host = _like_escape(filters.peer.strip("[]"))
        with_port = arg(f"{host}:%")
        bracketed = arg(f"[{host}]:%")
        clauses.append(
            f"(peer_address = {exact} OR peer_address LIKE {with_port} "
            f"OR peer_address LIKE {bracketed})"
        )
    if cursor is not None:
        time, event_id = decode_cursor(cursor)
        clauses.append(f"(time, id) < ({arg(time)}, {arg(event_id)})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _event(row: Any) -> AuthEvent:
    values = dict(row)
    if isinstance(values["detail"], str):  # no jsonb codec on this connection
        values["detail"] = json.loads(values["detail"])
    return AuthEvent(**values)


async def query_events(
    conn: Any, *, filters: EventFilter, limit: int, cursor: str | None
) -> tuple[list[AuthEvent], str | None]:
    """One page of events, newest first, and the cursor of the next page (``None`` at the end).

    Raises:
        RequestInvalid: a malformed cursor or a limit outside 1..1000.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise RequestInvalid(f"limit must be between 1 and {MAX_LIMIT}")
    where, args = _where(filters, cursor)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM auth_events{where} "  # noqa: S608 - only placeholders are interpolated
        f"ORDER BY time DESC, id DESC LIMIT {limit + 1}",
        *args,
    )
    events = [_event(row) for row in rows[:limit]]
    next_cursor = (
        encode_cursor(events[-1].time, events[-1].id) if len(rows) > limit and events else None
    )
    return events, next_cursor
