"""Appending provisioning's auth events to their hash chain, inside the caller's transaction.

Invariants:
- Call only inside a transaction: the head row of ``event_chains`` is locked ``FOR UPDATE``
  until commit, which serialises appends, so ``seq`` has no gaps and ``prev_hash`` is the
  hash of the previous committed event. A rollback discards the events with the change.
- Lock order is "rows of the change first, chain head last" everywhere, so writers that
  touch the same device cannot deadlock with each other over the head.
- Event times are taken after the lock is held, so times along the chain never go back.
- ``pg_notify(EVENTS_CHANNEL, ...)`` is queued in the same transaction: listeners hear only
  about committed events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.events import GENESIS_HASH, AuthEvent, EventType, Outcome, Reason, utcnow
from schemas.notify import EVENTS_CHANNEL

CHAIN_ID = "provisioning"

Connection = Any

_LOCK_HEAD = "SELECT seq, hash FROM event_chains WHERE chain_id = $1 FOR UPDATE"

_INSERT = """
INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, fleet,
    cert_serial, cert_fingerprint, client_id, peer_address, tls_version, tls_cipher,
    detail, chain_id, seq, prev_hash, hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb,
    $16, $17, $18, $19)
"""

# One round trip moves the head and queues one notification per event.
_ADVANCE = """
WITH head AS (
    UPDATE event_chains SET seq = $2, hash = $3, updated_at = now() WHERE chain_id = $1
    RETURNING seq
)
SELECT pg_notify($4, note) FROM head, unnest($5::text[]) AS note
"""


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
        event.id, event.time, event.instance, str(event.type), str(event.outcome),
        str(event.reason), event.device_id, event.fleet, event.cert_serial,
        event.cert_fingerprint, event.client_id, event.peer_address, event.tls_version,
        event.tls_cipher, json.dumps(event.detail, sort_keys=True), event.chain_id, event.seq,
        event.prev_hash, event.hash,
    )


async def append_events(conn: Connection, specs: Sequence[EventSpec]) -> list[AuthEvent]:
    """Chain and insert ``specs`` in order on the provisioning chain; returns them as stored."""
    if not specs:
        return []
    head = await conn.fetchrow(_LOCK_HEAD, CHAIN_ID)
    if head is None:
        await conn.execute(
            "INSERT INTO event_chains (chain_id, seq, hash) VALUES ($1, 0, $2) "
            "ON CONFLICT DO NOTHING",
            CHAIN_ID, GENESIS_HASH,
        )
        head = await conn.fetchrow(_LOCK_HEAD, CHAIN_ID)
    seq, prev_hash = head["seq"], head["hash"]
    events: list[AuthEvent] = []
    for spec in specs:
        seq += 1
        event = AuthEvent(
            time=utcnow(),
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
        ).chained(chain_id=CHAIN_ID, seq=seq, prev_hash=prev_hash)
        prev_hash = event.hash or ""
        events.append(event)
    if len(events) == 1:
        await conn.execute(_INSERT, *_row(events[0]))
    else:
        await conn.executemany(_INSERT, [_row(event) for event in events])
    notes = [json.dumps({"id": str(e.id), "time": e.time.isoformat()}) for e in events]
    await conn.execute(_ADVANCE, CHAIN_ID, seq, prev_hash, EVENTS_CHANNEL, notes)
    return events


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
        type=type, outcome=outcome, reason=reason, instance=instance, device_id=device_id,
        fleet=fleet, cert_serial=cert_serial, cert_fingerprint=cert_fingerprint,
        peer_address=peer_address, tls_version=tls_version, tls_cipher=tls_cipher,
        detail=detail or {},
    )
    (event,) = await append_events(conn, [spec])
    return event
