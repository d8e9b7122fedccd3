"""Following the auth event log live (``devicegate audit --follow``, live views).

Invariants:

- LISTEN starts before the initial page is read, so an event committed in between is
  either in the page or announced: nothing falls between the two.
- No polling: the loop sleeps until a notification on `EVENTS_CHANNEL` arrives, then reads
  exactly what it announces. The gateway sink announces ``{"chain_id", "min_seq",
  "max_seq"}`` per committed batch, which also covers events replayed late from a spool
  with old timestamps; provisioning announces ``{"id", "time"}`` per event. Any other
  payload falls back to rows after the newest ``(time, id)`` already shown.
- Every event is shown once: replays and overlaps are dropped by id.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

from provisioning.audit.query import EventFilter, query_events
from schemas.events import AuthEvent
from schemas.notify import EVENTS_CHANNEL

Connection = Any  # asyncpg.Connection

_COLUMNS = (
    "id, time, instance, type, outcome, reason, device_id, fleet, cert_serial, "
    "cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail, chain_id, "
    "seq, prev_hash, hash"
)
_SELECT = f"SELECT {_COLUMNS} FROM auth_events WHERE "  # noqa: S608 - constant columns
_SEEN_MAX = 100_000


class FollowLost(Exception):
    """The connection carrying LISTEN went away."""


def matches(event: AuthEvent, filters: EventFilter) -> bool:
    """Whether ``event`` passes ``filters`` (the same rules as the SQL of `query_events`)."""
    if filters.device_id is not None and event.device_id != filters.device_id:
        return False
    if filters.since is not None and event.time < filters.since:
        return False
    if filters.until is not None and event.time >= filters.until:
        return False
    for name in ("type", "outcome", "reason"):
        wanted = getattr(filters, name)
        if wanted is not None and str(getattr(event, name)) != str(wanted):
            return False
    if filters.peer is not None:
        host = filters.peer.strip("[]")
        peer = event.peer_address or ""
        if peer != filters.peer and not peer.startswith((f"{host}:", f"[{host}]:")):
            return False
    return True


def _event(row: Any) -> AuthEvent:
    values = dict(row)
    if isinstance(values["detail"], str):
        values["detail"] = json.loads(values["detail"])
    return AuthEvent(**values)


async def fetch_announced(
    conn: Connection, payload: str, newest: tuple[datetime, uuid.UUID] | None
) -> list[AuthEvent]:
    """The events a notification payload announces, oldest first."""
    try:
        notice = json.loads(payload)
    except ValueError:
        notice = None
    if isinstance(notice, dict) and {"chain_id", "max_seq"} <= notice.keys():
        first = notice["min_seq"] if "min_seq" in notice else notice["max_seq"]
        rows = await conn.fetch(
            _SELECT + "chain_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
            notice["chain_id"], int(first), int(notice["max_seq"]),
        )  # fmt: skip
    elif isinstance(notice, dict) and "id" in notice:
        rows = await conn.fetch(_SELECT + "id = $1", uuid.UUID(str(notice["id"])))
    elif newest is not None:
        rows = await conn.fetch(
            _SELECT + "(time, id) > ($1, $2) ORDER BY time, id LIMIT 1000", *newest
        )
    else:
        rows = await conn.fetch(_SELECT + "true ORDER BY time DESC, id DESC LIMIT 100")
        rows = list(reversed(rows))
    return [_event(row) for row in rows]


async def follow(
    conn: Connection,
    *,
    filters: EventFilter,
    initial_limit: int,
    show: Callable[[AuthEvent], None],
    ready: Callable[[], None] | None = None,
) -> None:
    """Show the newest ``initial_limit`` matching events, then every new one, forever.

    Raises:
        FollowLost: the connection closed.
    """
    announced: asyncio.Queue[str | None] = asyncio.Queue()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        announced.put_nowait(payload)

    conn.add_termination_listener(lambda _conn: announced.put_nowait(None))
    await conn.add_listener(EVENTS_CHANNEL, on_notify)
    seen: set[uuid.UUID] = set()
    order: deque[uuid.UUID] = deque()
    newest: tuple[datetime, uuid.UUID] | None = None

    def emit(event: AuthEvent) -> None:
        nonlocal newest
        if event.id in seen:
            return
        seen.add(event.id)
        order.append(event.id)
        if len(order) > _SEEN_MAX:
            seen.discard(order.popleft())
        if newest is None or (event.time, event.id) > newest:
            newest = (event.time, event.id)
        if matches(event, filters):
            show(event)

    if initial_limit > 0:
        page, _ = await query_events(conn, filters=filters, limit=initial_limit, cursor=None)
        for event in reversed(page):
            emit(event)
    if ready is not None:
        ready()
    while True:
        payload = await announced.get()
        if payload is None:
            raise FollowLost("connection to PostgreSQL lost")
        for event in await fetch_announced(conn, payload, newest):
            emit(event)
