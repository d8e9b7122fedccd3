"""``audit summary`` and the console overview count decisions, not rows, and group peers by
host: a throttled summary of 600 refused handshakes counts 600 (``detail.count``, or the
older ``detail.refused``), an admitted session's denial summary its ``count``, a flood of
anonymous requests its summary's ``count``; ``events_lost`` stays one row. Real PostgreSQL,
through the live path (events) and the rollup path (after `rollup.fill`)."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from provisioning.audit.summary import summarize
from provisioning.console import rollup
from schemas.events import GENESIS_HASH, AuthEvent, EventType, Outcome, Reason
from tests.conftest import _create_database, _drop_database

# (type, outcome, reason, peer address, device, detail): rows as the writers shape them.
ROWS: list[tuple[EventType, Outcome, Reason, str | None, str | None, dict[str, Any]]] = [
    # The gateway's throttled refusals at accept: the first at once, then the burst.
    (
        EventType.TLS_HANDSHAKE,
        Outcome.DENIED,
        Reason.RATE_LIMITED,
        "1.2.3.4:5",
        None,
        {"summary": True, "count": 1, "address": "1.2.3.4", "window_seconds": 10.0},
    ),
    (
        EventType.TLS_HANDSHAKE,
        Outcome.DENIED,
        Reason.RATE_LIMITED,
        "1.2.3.4:6",
        None,
        {"summary": True, "count": 599, "address": "1.2.3.4", "window_seconds": 10.0},
    ),
    # A row written before the key was unified.
    (
        EventType.TLS_HANDSHAKE,
        Outcome.DENIED,
        Reason.TOO_MANY_CONNECTIONS,
        "1.2.3.4",
        None,
        {"refused": 7, "window_seconds": 10.0, "max_connections": 3},
    ),
    # An admitted session's denial summary and one SUBSCRIBE denying three filters.
    (
        EventType.PUBLISH,
        Outcome.DENIED,
        Reason.TOPIC_NOT_AUTHORIZED,
        "[2001:db8::1]:5",
        "dev-a",
        {"summary": True, "count": 250, "topics": ["x"], "window_seconds": 60.0},
    ),
    (
        EventType.SUBSCRIBE,
        Outcome.DENIED,
        Reason.TOPIC_NOT_AUTHORIZED,
        "2001:db8::1",
        "dev-a",
        {"count": 3, "filters": ["a", "b", "c"]},
    ),
    # An anonymous flood's summary (provisioning's refusal budget).
    (
        EventType.RENEW,
        Outcome.DENIED,
        Reason.NO_CLIENT_CERTIFICATE,
        "[2001:db8::1]:7",
        None,
        {"summary": True, "count": 9990, "method": "POST", "path": "/v1/renew"},
    ),
    # One full decision each.
    (EventType.CONNECT, Outcome.ALLOWED, Reason.OK, "198.51.100.9:4000", "dev-b", {}),
    (EventType.CONNECT, Outcome.DENIED, Reason.CLIENT_ID_MISMATCH, "1.2.3.4:9", "dev-b", {}),
    # A record of lost log records: its count is not of decisions.
    (
        EventType.EVENTS_LOST,
        Outcome.DENIED,
        Reason.EVENT_LOG_UNAVAILABLE,
        None,
        None,
        {"count": 1000, "lost": []},
    ),
]
DENIED_BY_REASON = {
    ("denied", "rate_limited"): 600,
    ("denied", "too_many_connections"): 7,
    ("denied", "topic_not_authorized"): 253,
    ("denied", "no_client_certificate"): 9990,
    ("allowed", "ok"): 1,
    ("denied", "client_id_mismatch"): 1,
    ("denied", "event_log_unavailable"): 1,
}
PEERS = [("1.2.3.4", 600 + 7 + 1), ("2001:db8::1", 250 + 3 + 9990)]


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    name = f"dg_test_decisions_{secrets.token_hex(4)}"
    url = await _create_database(name, migrated=True)
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()
        await _drop_database(name)


async def _load(conn: asyncpg.Connection, time: datetime) -> None:
    prev = GENESIS_HASH
    for seq, (type_, outcome, reason, peer, device, detail) in enumerate(ROWS, 1):
        event = AuthEvent(
            time=time, instance="decisions", type=type_, outcome=outcome, reason=reason,
            device_id=device, peer_address=peer, detail=detail,
        ).chained(chain_id="decisions/w0", seq=seq, prev_hash=prev)  # fmt: skip
        prev = event.hash
        await conn.execute(
            "INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, "
            "peer_address, detail, chain_id, seq, prev_hash, hash) VALUES ($1, $2, $3, $4, "
            "$5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13)",
            event.id, event.time, event.instance, str(event.type), str(event.outcome),
            str(event.reason), event.device_id, event.peer_address, json.dumps(event.detail),
            event.chain_id, event.seq, event.prev_hash, event.hash,
        )  # fmt: skip


async def test_summary_counts_decisions_and_hosts(conn: asyncpg.Connection) -> None:
    now = await conn.fetchval("SELECT now()")
    await _load(conn, now - timedelta(minutes=1))
    result = await summarize(conn, since=now - timedelta(hours=1))
    assert {(o, r): n for o, r, n in result.by_reason} == DENIED_BY_REASON
    assert result.total == sum(DENIED_BY_REASON.values())
    assert result.by_outcome == {"allowed": 1, "denied": result.total - 1}
    assert result.top_denied_peers == sorted(PEERS, key=lambda p: -p[1])
    assert result.top_denied_devices == [("dev-a", 253), ("dev-b", 1)]


async def test_overview_counts_decisions_live_and_rolled_up(conn: asyncpg.Connection) -> None:
    now = await conn.fetchval("SELECT now()")
    hour = rollup.floor_hour(now)
    await _load(conn, hour - timedelta(hours=2, minutes=-5))  # a closed hour
    start, end = hour - timedelta(hours=24), hour + rollup.HOUR
    for filled in (False, True):
        if filled:
            report = await rollup.fill(conn, now=now)
            assert report is not None and report.filled_upto > hour - timedelta(hours=2)
        shown = await rollup.activity(conn, start=start, end=end, stride=rollup.HOUR)
        assert (shown.rolled_upto is not None) is filled
        got = Counter[tuple[str, str]]()
        for row in shown.rows:
            got[(row.outcome, row.reason)] += row.count
        assert got == DENIED_BY_REASON
        assert shown.peers == sorted(PEERS, key=lambda p: -p[1])
        assert shown.devices == [("dev-a", 253), ("dev-b", 1)]
    # The rollup's row counts still match the events: no hour is recounted for nothing.
    checked = await rollup.fill(conn, now=now, reconcile=timedelta(0))
    assert checked is not None and checked.recounted_hours == 0
