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

from schemas.events import (
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

# One round trip inserts the events (one array per column, in chain order), moves the head
# and queues one notification per event, in the same order.
_APPEND = """
WITH inserted AS (
    INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, fleet,
        cert_serial, cert_fingerprint, client_id, peer_address, tls_version, tls_cipher,
        detail, chain_id, seq, prev_hash, hash)
    SELECT e.id, e.time, e.instance, e.type, e.outcome, e.reason, e.device_id, e.fleet,
        e.cert_serial, e.cert_fingerprint, e.client_id, e.peer_address, e.tls_version,
        e.tls_cipher, e.detail::jsonb, e.chain_id, e.seq, e.prev_hash, e.hash
    FROM unnest($6::uuid[], $7::timestamptz[], $8::text[], $9::text[], $10::text[],
        $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[],
        $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::bigint[],
        $23::text[], $24::text[])
        AS e(id, time, instance, type, outcome, reason, device_id, fleet, cert_serial,
            cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail,
            chain_id, seq, prev_hash, hash)
), head AS (
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
            chain_id=CHAIN_ID,
            seq=seq,
            prev_hash=prev_hash,
        )
        # As `AuthEvent.chained`, with one copy: the link fields are set at construction.
        prev_hash = chain_hash(prev_hash, event)
        event = event.model_copy(update={"hash": prev_hash})
        events.append(event)
    notes = [json.dumps({"id": str(e.id), "time": e.time.isoformat()}) for e in events]
    columns = [list(column) for column in zip(*(_row(event) for event in events), strict=True)]
    await conn.execute(_APPEND, CHAIN_ID, seq, prev_hash, EVENTS_CHANNEL, notes, *columns)
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
