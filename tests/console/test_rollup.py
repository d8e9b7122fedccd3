"""The overview's hourly rollup against a GROUP BY over ``auth_events``: after the first fill,
with new events in the current hour, with a late event in a filled hour, and across
``audit prune`` (dropped partitions, a surviving default-partition event)."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from provisioning.audit.prune import prune
from provisioning.console import rollup
from provisioning.console.queries import ORIGIN
from schemas.events import GENESIS_HASH, AuthEvent, EventType, Outcome, Reason
from tests.conftest import _create_database, _db_url, _drop_database
from tests.console.synthetic import load

WEEK = (timedelta(days=7), timedelta(hours=3))


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    """A migrated database of the test's own with 20,000 synthetic events over the week."""
    name = f"dg_test_rollup_{secrets.token_hex(4)}"
    url = await _create_database(name, migrated=True)
    connection = await asyncpg.connect(url)
    try:
        await load(connection, events=20_000)
        yield connection
    finally:
        await connection.close()
        await _drop_database(name)


async def _rollup_rows(conn: asyncpg.Connection) -> tuple[set[Any], set[Any]]:
    activity = await conn.fetch(
        "SELECT hour, connection, outcome, reason, events FROM auth_event_hourly"
    )
    denials = await conn.fetch("SELECT hour, device, value, events FROM auth_event_hourly_denials")
    return {tuple(r) for r in activity}, {tuple(r) for r in denials}


async def _grouped(
    conn: asyncpg.Connection, start: datetime, end: datetime
) -> tuple[set[Any], set[Any]]:
    """The same rows written independently (date_trunc, a regular expression for hosts)."""
    activity = await conn.fetch(
        """SELECT date_trunc('hour', time), type IN ('tls_handshake', 'connect'), outcome,
                  reason, count(*)
           FROM auth_events WHERE time >= $1 AND time < $2 GROUP BY 1, 2, 3, 4""",
        start, end,
    )  # fmt: skip
    denials = await conn.fetch(
        """SELECT date_trunc('hour', time), true, device_id, count(*) FROM auth_events
           WHERE outcome = 'denied' AND device_id IS NOT NULL AND time >= $1 AND time < $2
           GROUP BY 1, 3
           UNION ALL
           SELECT date_trunc('hour', time), false, regexp_replace(peer_address, ':[^:]*$', ''),
                  count(*) FROM auth_events
           WHERE outcome = 'denied' AND peer_address IS NOT NULL AND time >= $1 AND time < $2
           GROUP BY 1, 3""",
        start, end,
    )  # fmt: skip
    return {tuple(r) for r in activity}, {tuple(r) for r in denials}


async def assert_rollup_exact(conn: asyncpg.Connection) -> tuple[datetime, datetime]:
    """Every rollup row equals the GROUP BY of its hour, and no hour is missing or extra."""
    state = await conn.fetchrow("SELECT filled_from, filled_upto FROM auth_event_rollup")
    start, end = state["filled_from"], state["filled_upto"]
    assert start is not None and end is not None and start < end
    assert await _rollup_rows(conn) == await _grouped(conn, start, end)
    return start, end


async def assert_overview_exact(
    conn: asyncpg.Connection, *, span: timedelta, stride: timedelta
) -> rollup.Activity:
    """`rollup.activity` for a window ending after now equals counts over the events."""
    now = await conn.fetchval("SELECT now()")
    end = ORIGIN + ((now - ORIGIN) // stride + 1) * stride
    start = end - span
    shown = await rollup.activity(conn, start=start, end=end, stride=stride)
    got = Counter[tuple[Any, ...]]()
    for row in shown.rows:
        got[(row.bucket, row.connection, row.outcome, row.reason)] += row.count
    expected = await conn.fetch(
        """SELECT date_bin($3::interval, time, $4::timestamptz),
                  type IN ('tls_handshake', 'connect'), outcome, reason, count(*)
           FROM auth_events WHERE time >= $1 AND time < $2 GROUP BY 1, 2, 3, 4""",
        start, end, stride, ORIGIN,
    )  # fmt: skip
    assert got == {tuple(r[:4]): r[4] for r in expected}
    devices = await conn.fetch(
        """SELECT device_id, count(*) FROM auth_events WHERE outcome = 'denied'
           AND device_id IS NOT NULL AND time >= $1 AND time < $2
           GROUP BY 1 ORDER BY 2 DESC, device_id COLLATE "C" LIMIT 10""", start, end,
    )  # fmt: skip
    peers = await conn.fetch(
        """SELECT regexp_replace(peer_address, ':[^:]*$', ''), count(*) FROM auth_events
           WHERE outcome = 'denied' AND peer_address IS NOT NULL AND time >= $1 AND time < $2
           GROUP BY 1
           ORDER BY 2 DESC, regexp_replace(peer_address, ':[^:]*$', '') COLLATE "C" LIMIT 10""",
        start, end,
    )  # fmt: skip
    assert shown.devices == [tuple(r) for r in devices]
    assert shown.peers == [tuple(r) for r in peers]
    return shown


async def insert(conn: asyncpg.Connection, time: datetime, seq: int, **fields: Any) -> None:
    event = AuthEvent(
        time=time, instance="rollup-gw", type=fields.get("type", EventType.CONNECT),
        outcome=fields.get("outcome", Outcome.DENIED),
        reason=fields.get("reason", Reason.RATE_LIMITED),
        device_id=fields.get("device_id", "rollup-device"),
        peer_address=fields.get("peer_address", "198.51.100.7:5000"),
    ).chained(chain_id="rollup-gw/w0", seq=seq, prev_hash=GENESIS_HASH)  # fmt: skip
    await conn.execute(
        "INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, "
        "peer_address, detail, chain_id, seq, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, "
        "$7, $8, $9::jsonb, $10, $11, $12, $13)",
        event.id, event.time, event.instance, str(event.type), str(event.outcome),
        str(event.reason), event.device_id, event.peer_address, json.dumps(event.detail),
        event.chain_id, event.seq, event.prev_hash, event.hash,
    )  # fmt: skip


async def test_fill_then_new_hours_then_late_events(conn: asyncpg.Connection) -> None:
    # Nothing filled yet: the week is counted from the events, and still exact.
    assert (await assert_overview_exact(conn, span=WEEK[0], stride=WEEK[1])).rolled_upto is None

    first = await rollup.fill(conn)
    assert first is not None and first.new_hours >= 8 * 24 - 1
    start, end = await assert_rollup_exact(conn)
    assert end == rollup.floor_hour(await conn.fetchval("SELECT now()") - rollup.SETTLE)
    shown = await assert_overview_exact(conn, span=WEEK[0], stride=WEEK[1])
    assert shown.rolled_upto == end  # the rollup served everything before the current hour
    assert (await assert_overview_exact(conn, span=timedelta(days=1), stride=rollup.HOUR)
            ).rolled_upto == end  # fmt: skip
    assert (await assert_overview_exact(conn, span=rollup.HOUR, stride=timedelta(minutes=1))
            ).rolled_upto is None  # minute buckets: always the events  # fmt: skip
    again = await rollup.fill(conn)
    assert again is not None and (again.new_hours, again.recounted_hours) == (0, 0)

    # New events in the current hour: shown at once (read live), rolled up once it is over.
    now = await conn.fetchval("SELECT now()")
    for seq in range(1, 4):
        await insert(conn, now - timedelta(seconds=seq), seq, device_id="fresh-device")
    shown = await assert_overview_exact(conn, span=WEEK[0], stride=WEEK[1])
    assert ("fresh-device", 3) in shown.devices or len(shown.devices) == 10
    later = await rollup.fill(conn, now=now + rollup.HOUR + rollup.SETTLE, reconcile=WEEK[0])
    assert later is not None and later.new_hours >= 1
    _, end = await assert_rollup_exact(conn)
    assert end > now
    assert (
        await conn.fetchval(
            "SELECT events FROM auth_event_hourly_denials WHERE device AND value = 'fresh-device'"
        )
        == 3
    )

    # A gateway replays an old event from its spool into a filled hour: the next
    # reconciliation finds that one hour and recounts it.
    await insert(conn, start + timedelta(days=3, minutes=7), 4, device_id="late-device")
    quiet = await rollup.fill(conn, reconcile=WEEK[0])
    assert quiet is not None and quiet.recounted_hours == 0
    assert await _rollup_rows(conn) != await _grouped(conn, start, end)  # not yet
    checked = await rollup.fill(conn, reconcile=timedelta(0))
    assert checked is not None and checked.recounted_hours == 1
    await assert_rollup_exact(conn)
    await assert_overview_exact(conn, span=WEEK[0], stride=WEEK[1])


async def test_prune_leaves_no_stale_rows(conn: asyncpg.Connection) -> None:
    now: datetime = await conn.fetchval("SELECT now()")
    await conn.execute("SELECT devicegate_ensure_partitions(4, 3)")
    old = now - timedelta(days=100)  # in a monthly partition that the prune drops
    ancient = now - timedelta(days=300)  # no partition: the default one, which survives
    await insert(conn, old, 1, device_id="old-device")
    await insert(conn, old + timedelta(hours=5), 2, device_id="old-device")
    await insert(conn, ancient, 3, device_id="ancient-device")
    filled = await rollup.fill(conn, backfill=timedelta(days=320))
    assert filled is not None
    start, _ = await assert_rollup_exact(conn)
    assert start <= ancient
    assert (
        await conn.fetchval(
            "SELECT sum(events) FROM auth_event_hourly_denials WHERE value = 'old-device'"
        )
        == 2
    )

    result = await prune(conn, older_than=timedelta(days=62), instance="rollup-test")
    assert result.partitions and result.events >= 2
    boundary = rollup.prune_boundary(result.partitions)
    assert boundary is not None and old < boundary
    # Before the filler has run: a window reaching before the boundary reads the events...
    span = timedelta(days=(now - start).days)  # day buckets from the first filled day on
    shown = await assert_overview_exact(conn, span=span, stride=timedelta(days=1))
    assert shown.rolled_upto is None and ("old-device", 2) not in shown.devices
    # ...one after it still reads the rollup.
    week = await assert_overview_exact(conn, span=WEEK[0], stride=WEEK[1])
    assert week.rolled_upto is not None

    after = await rollup.fill(conn, reconcile=WEEK[0])
    assert after is not None and after.recounted_hours > 0
    await assert_rollup_exact(conn)  # the dropped hours are gone, the default one kept
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM auth_event_hourly_denials WHERE value = 'old-device'"
        )
        == 0
    )
    assert (
        await conn.fetchval(
            "SELECT events FROM auth_event_hourly_denials WHERE value = 'ancient-device'"
        )
        == 1
    )
    shown = await assert_overview_exact(conn, span=span, stride=timedelta(days=1))
    assert shown.rolled_upto is not None


async def test_one_filler_at_a_time(conn: asyncpg.Connection) -> None:
    """A second replica finding the state row locked skips its turn instead of waiting."""
    database = await conn.fetchval("SELECT current_database()")
    second = await asyncpg.connect(_db_url(database))
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM auth_event_rollup FOR UPDATE")
            assert await rollup.fill(second) is None
        assert await rollup.fill(second) is not None
    finally:
        await second.close()


async def test_a_long_stop_starts_afresh(conn: asyncpg.Connection) -> None:
    """A service back after longer than the backfill restarts the rollup there instead of
    counting every hour since (and keeps no row outside its bounds)."""
    assert await rollup.fill(conn) is not None
    now: datetime = await conn.fetchval("SELECT now()")
    later = now + timedelta(days=20)
    report = await rollup.fill(conn, now=later)
    assert report is not None
    assert report.filled_from == rollup.floor_hour(later - rollup.BACKFILL)
    assert report.filled_upto == rollup.floor_hour(later - rollup.SETTLE)
    start, _ = await assert_rollup_exact(conn)
    assert await conn.fetchval("SELECT count(*) FROM auth_event_hourly WHERE hour < $1",
                               start) == 0  # fmt: skip
