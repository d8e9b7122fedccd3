# ruff: noqa: S608 - f-strings here only splice constant column lists; values are $n.
"""Appending provisioning's auth events to their hash chain, inside the caller's transaction.

Invariants:
- Call only inside a transaction: the head row of ``event_chains`` is locked ``FOR UPDATE``
  until commit, which serialises appends, so ``seq`` has no gaps and ``prev_hash`` is the
  hash of the previous committed event. A rollback discards the events with the change.
- Lock order is "rows of the change first, chain head last" everywhere, so writers that
  touch the same device cannot deadlock with each other over the head.
- Event times are taken after the lock is held, so times along the chain never go back.
  A writer that knows the head it committed last (`ChainHead`, the group committer) may
  skip the locking read: it chains onto that head (times not before its last event's) and
  moves the head only if it is still that head, checked by the UPDATE under the row lock
  (no event is inserted otherwise); if another writer moved it, the locked path runs in
  the same transaction.
- ``pg_notify(EVENTS_CHANNEL, ...)`` is queued in the same transaction: listeners hear only
  about committed events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import (
    COLUMNS,
    GENESIS_HASH,
    AuthEvent,
    EventType,
    Outcome,
    Reason,
    chain_hash,
    utcnow,
)
from schemas.notify import EVENTS_CHANNEL

CHAIN_ID = "provisioning"

Connection = Any

_LOCK_HEAD = "SELECT seq, hash FROM event_chains WHERE chain_id = $1 FOR UPDATE"

_EVENT_TYPES = (
    "uuid",
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "text",
    "text",
)


def insert_events_sql(first: int, *, gate: str) -> str:
    """``INSERT INTO auth_events`` of the arrays `event_arrays` returns, bound from ``$first``
    on, inserting only ``WHERE`` ``gate`` holds (for a CTE of a larger statement)."""
    columns = ", ".join(COLUMNS)
    selected = ", ".join(
        f"e.{name}::jsonb" if name == "detail" else f"e.{name}" for name in COLUMNS
    )
    arrays = ", ".join(f"${first + i}::{kind}[]" for i, kind in enumerate(_EVENT_TYPES))
    return (
        f"INSERT INTO auth_events ({columns}) SELECT {selected} "
        f"FROM unnest({arrays}) AS e({columns}) WHERE {gate}"
    )


def event_arrays(events: Sequence[AuthEvent]) -> list[list[Any]]:
    """The events as one array per column, in chain order (for `insert_events_sql`)."""
    return [list(column) for column in zip(*(_row(event) for event in events), strict=True)]


def event_notes(events: Sequence[AuthEvent]) -> list[str]:
    """The ``EVENTS_CHANNEL`` payload of each event, in chain order."""
    return [json.dumps({"id": str(e.id), "time": e.time.isoformat()}) for e in events]


# One round trip moves the head, inserts the events and queues one notification per event,
# in chain order. With an expected head ($6, $7) nothing happens unless the head is still
# that one: then no row comes back.
_APPEND = f"""
WITH head AS (
    UPDATE event_chains SET seq = $2, hash = $3, updated_at = now()
    WHERE chain_id = $1 AND ($6::bigint IS NULL OR (seq = $6 AND hash = $7))
    RETURNING seq
), inserted AS (
    {insert_events_sql(8, gate="EXISTS (SELECT FROM head)")}
)
SELECT pg_notify($4, note) FROM head, unnest($5::text[]) AS note
"""


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The provisioning chain's head after a committed append: its seq, hash and the time
    of its last event."""

    seq: int
    hash: str
    time: datetime

    @classmethod
    def after(cls, events: Sequence[AuthEvent]) -> ChainHead:
        last = events[-1]
        assert last.seq is not None and last.hash is not None
        return cls(last.seq, last.hash, last.time)


@dataclass(frozen=True, slots=True)
class EventSpec:
    """An event to record, before it has a time and a place in the chain."""

    type: EventType
    outcome: Outcome
    reason: Reason
    instance: str
    device_id: str | None = None
    fleet: str | None = None
    cert_serial: str | None = None
    cert_fingerprint: str | None = None
    peer_address: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _row(event: AuthEvent) -> tuple[Any, ...]:
    return (
        event.id,
        event.time,
        event.instance,
        str(event.type),
        str(event.outcome),
        str(event.reason),
        event.device_id,
        event.fleet,
        event.cert_serial,
        event.cert_fingerprint,
        event.client_id,
        event.peer_address,
        event.tls_version,
        event.tls_cipher,
        json.dumps(event.detail, sort_keys=True),
        event.chain_id,
        event.seq,
        event.prev_hash,
        event.hash,
    )


def chain_events(specs: Sequence[EventSpec], after: ChainHead) -> list[AuthEvent]:
    """``specs`` chained onto ``after`` (for a writer that moves the head itself, with the
    same check `append_events` makes: only if the head is still ``after``)."""
    return _chain(specs, after.seq, after.hash, not_before=after.time)


async def append_events(
    conn: Connection, specs: Sequence[EventSpec], *, expect: ChainHead | None = None
) -> list[AuthEvent]:
    """Chain and insert ``specs`` in order on the provisioning chain; returns them as stored.

    Args:
        expect: the head this writer committed last, if it knows it: then the head is not
            read first (one round trip less) unless another writer has moved it since.
    """
    if not specs:
        return []
    if expect is not None:
        events = _chain(specs, expect.seq, expect.hash, not_before=expect.time)
        if await _write(conn, events, expect=expect):
            return events
    head = await lock_head(conn)
    events = _chain(specs, head["seq"], head["hash"])
    await _write(conn, events, expect=None)
    return events


async def lock_head(conn: Connection) -> Any:
    """Lock the provisioning chain's head row until the transaction ends (creating it at
    its genesis the first time); returns it (``seq``, ``hash``).

    For a writer that must hold the head before a lock taken later (the policy version:
    see schemas/sql/0009_policies.sql), so that its lock order is the one everyone uses.
    """
    head = await conn.fetchrow(_LOCK_HEAD, CHAIN_ID)
    if head is None:
        await conn.execute(
            "INSERT INTO event_chains (chain_id, seq, hash) VALUES ($1, 0, $2) "
            "ON CONFLICT DO NOTHING",
            CHAIN_ID,
            GENESIS_HASH,
        )
        head = await conn.fetchrow(_LOCK_HEAD, CHAIN_ID)
    return head


def _chain(
    specs: Sequence[EventSpec], seq: int, prev_hash: str, *, not_before: datetime | None = None
) -> list[AuthEvent]:
    events: list[AuthEvent] = []
    for spec in specs:
        seq += 1
        now = utcnow()
        if not_before is not None and now < not_before:  # the clock went back: keep order
            now = not_before
        event = AuthEvent(
            time=now,
            instance=spec.instance,
            type=spec.type,
            outcome=spec.outcome,
            reason=spec.reason,
            device_id=spec.device_id,
            fleet=spec.fleet,
            cert_serial=spec.cert_serial,
            cert_fingerprint=spec.cert_fingerprint,
            peer_address=spec.peer_address,
            tls_version=spec.tls_version,
            tls_cipher=spec.tls_cipher,
            detail=spec.detail,
            chain_id=CHAIN_ID,
            seq=seq,
            prev_hash=prev_hash,
        )
        # As `AuthEvent.chained`, with one copy: the link fields are set at construction.
        prev_hash = chain_hash(prev_hash, event)
        events.append(event.model_copy(update={"hash": prev_hash}))
    return events


async def _write(conn: Connection, events: list[AuthEvent], *, expect: ChainHead | None) -> bool:
    """Insert ``events`` and move the head to the last; False (nothing written) when
    ``expect`` is given and the head is no longer that one."""
    last = events[-1]
    status = await conn.execute(
        _APPEND,
        CHAIN_ID,
        last.seq,
        last.hash,
        EVENTS_CHANNEL,
        event_notes(events),
        expect.seq if expect is not None else None,
        expect.hash if expect is not None else None,
        *event_arrays(events),
    )
    return bool(status != "SELECT 0")


async def append_event(
    conn: Connection,
    *,
    instance: str,
    type: EventType,
    outcome: Outcome,
    reason: Reason,
    device_id: str | None = None,
    fleet: str | None = None,
    cert_serial: str | None = None,
    cert_fingerprint: str | None = None,
    peer_address: str | None = None,
    tls_version: str | None = None,
    tls_cipher: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuthEvent:
    """Chain and insert one event on the provisioning chain; returns it as stored."""
    spec = EventSpec(
        type=type,
        outcome=outcome,
        reason=reason,
        instance=instance,
        device_id=device_id,
        fleet=fleet,
        cert_serial=cert_serial,
        cert_fingerprint=cert_fingerprint,
        peer_address=peer_address,
        tls_version=tls_version,
        tls_cipher=tls_cipher,
        detail=detail or {},
    )
    (event,) = await append_events(conn, [spec])
    return event
