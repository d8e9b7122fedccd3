"""The overview's hourly rollup of ``auth_events`` (migration ``0005_auth_event_hourly``).

A week holds every event of the week: aggregating a million rows per view takes seconds, so
closed hours are counted once, into ``auth_event_hourly`` (by admission, outcome, reason)
and ``auth_event_hourly_denials`` (denials by device and by peer host), and a view of the
day or the week reads those rows plus the hours since the last filled one from the events.

Invariants:
- Rollup rows are exact counts of every hour in ``[filled_from, filled_upto)``: of decisions
  (`provisioning.audit.counting.DECISIONS`), and of rows for the reconciliation; `fill`
  rewrites an hour (delete + insert) and moves the bounds in one transaction, so a reader's
  snapshot never sees half of it. A reader takes rows before ``filled_upto`` from the rollup
  and the rest from ``auth_events``, in one snapshot: the counts equal a GROUP BY over the
  events at that snapshot.
- An hour is filled once it ended at least `SETTLE` ago (group commit and spool shipping have
  landed its events). Events stored later with old times (a gateway replaying its spool after
  an outage) are found by `fill` every `RECONCILE`: per-hour totals of the last
  `RECONCILE_SPAN` are compared with the events (an index-only count) and only the hours that
  differ are recounted. Until then such an event is missing from the overview (never counted
  twice); the events page shows it at once.
- `audit prune` drops whole partitions. `fill` recounts every filled hour before the newest
  prune's boundary (only default-partition rows can remain there). Until it has, a reader
  whose window starts before that boundary ignores the rollup and counts the events.
- One filler at a time across replicas: ``FOR UPDATE SKIP LOCKED`` on the state row; a
  replica finding it locked skips its turn. Readers never take the lock.
- No trigger on ``auth_events``: the gateways' COPY path stays as fast as it was.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from provisioning.audit.counting import DECISIONS, PEER_HOST
from provisioning.console.queries import (
    ACTIVITY_WORK_MEM,
    CONNECTION_TYPES,
    ORIGIN,
    ActivityRow,
    live_activity,
)

log = logging.getLogger("devicegate.console")

Connection = Any  # asyncpg.Connection

HOUR = timedelta(hours=1)
SETTLE = timedelta(minutes=2)
BACKFILL = timedelta(days=8)
"""How far back an empty rollup starts: the longest overview range (a week) and a margin."""
RECONCILE = timedelta(minutes=10)
RECONCILE_SPAN = timedelta(days=8)
INTERVAL = 60.0
"""Seconds between `fill` runs of the service's background task."""
CHUNK = timedelta(days=1)
"""Hours aggregated per statement when many are filled at once (stays a hash aggregate)."""

_PARTITION = re.compile(r"^auth_events_(\d{4})_(\d{2})$")

_STATE = """SELECT filled_from, filled_upto, prune_id, reconciled_at, now() AS now
            FROM auth_event_rollup"""

_DELETE = ("DELETE FROM auth_event_hourly WHERE hour >= $1 AND hour < $2",
           "DELETE FROM auth_event_hourly_denials WHERE hour >= $1 AND hour < $2")  # fmt: skip

_INSERT_ACTIVITY = f"""
INSERT INTO auth_event_hourly (hour, connection, outcome, reason, events, rows)
SELECT date_bin('1 hour', time, $3::timestamptz), type = ANY($4::text[]), outcome, reason,
       sum({DECISIONS}), count(*)
FROM auth_events WHERE time >= $1 AND time < $2
GROUP BY 1, 2, 3, 4
"""  # noqa: S608 (constant SQL from provisioning.audit.counting)

# Denials by device and by peer host (`PEER_HOST`) in one pass.
_INSERT_DENIALS = f"""
INSERT INTO auth_event_hourly_denials (hour, device, value, events)
SELECT hour, by_device = 0, CASE WHEN by_device = 0 THEN device ELSE peer END, n FROM (
    SELECT date_bin('1 hour', time, $3::timestamptz) AS hour, device_id AS device,
           {PEER_HOST} AS peer, GROUPING(device_id) AS by_device, sum({DECISIONS}) AS n
    FROM auth_events WHERE outcome = 'denied' AND time >= $1 AND time < $2
    GROUP BY GROUPING SETS ((1, 2), (1, 3))
) AS grouped WHERE (CASE WHEN by_device = 0 THEN device ELSE peer END) IS NOT NULL
"""  # noqa: S608 (constant SQL from provisioning.audit.counting)

# Per-hour totals, events against rollup: the index-only count finds the hours that got
# late events (or lost some) without aggregating them.
_EVENT_TOTALS = """
SELECT date_bin('1 hour', time, $3::timestamptz) AS hour, count(*) AS n
FROM auth_events WHERE time >= $1 AND time < $2 GROUP BY 1
"""
_ROLLUP_TOTALS = """
SELECT hour, sum(rows)::bigint AS n FROM auth_event_hourly
WHERE hour >= $1 AND hour < $2 GROUP BY 1
"""

_ROLLUP_ACTIVITY = """
SELECT date_bin($3::interval, hour, $4::timestamptz) AS bucket, connection, outcome, reason,
       sum(events)::bigint AS n
FROM auth_event_hourly WHERE hour >= $1 AND hour < $2
GROUP BY 1, 2, 3, 4
"""

# Top denials of a window: rollup hours [$2, $3), then the events of [$3, $4).
_TOP_DENIALS = f"""
SELECT value, sum(n)::bigint AS n FROM (
    SELECT value, events AS n FROM auth_event_hourly_denials
    WHERE device = $1 AND hour >= $2 AND hour < $3
    UNION ALL
    SELECT CASE WHEN $1 THEN device_id ELSE {PEER_HOST} END, {DECISIONS}
    FROM auth_events WHERE outcome = 'denied' AND time >= $3 AND time < $4
) AS counted WHERE value IS NOT NULL
GROUP BY value ORDER BY n DESC, value COLLATE "C" LIMIT $5
"""  # noqa: S608 (constant SQL from provisioning.audit.counting)


def floor_hour(moment: datetime) -> datetime:
    return ORIGIN + ((moment - ORIGIN) // HOUR) * HOUR


def prune_boundary(partitions: list[str]) -> datetime | None:
    """The end of the newest month among dropped partitions (``auth_events_YYYY_MM``):
    every event before it was in a dropped partition or in the default one."""
    ends = []
    for name in partitions:
        if match := _PARTITION.match(name):
            year, month = int(match[1]), int(match[2])
            ends.append(datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC))
    return max(ends, default=None)


async def _pending_prune(conn: Connection, applied: int) -> datetime | None:
    rows = await conn.fetch("SELECT partitions FROM audit_prunes WHERE id > $1", applied)
    return max((b for r in rows if (b := prune_boundary(list(r["partitions"])))), default=None)


async def _recount(conn: Connection, start: datetime, end: datetime) -> None:
    """Rewrite the rollup rows of the hours in ``[start, end)``, a `CHUNK` per statement."""
    while start < end:
        upto = min(end, start + CHUNK)
        for sql in _DELETE:
            await conn.execute(sql, start, upto)
        await conn.execute(_INSERT_ACTIVITY, start, upto, ORIGIN, list(CONNECTION_TYPES))
        await conn.execute(_INSERT_DENIALS, start, upto, ORIGIN)
        start = upto


@dataclass(frozen=True, slots=True)
class FillReport:
    """What one `fill` did: hours newly filled, hours recounted (late events or a prune)."""

    filled_from: datetime
    filled_upto: datetime
    new_hours: int
    recounted_hours: int


async def fill(
    conn: Connection,
    *,
    now: datetime | None = None,
    backfill: timedelta = BACKFILL,
    reconcile: timedelta = RECONCILE,
) -> FillReport | None:
    """Bring the rollup up to date; ``None`` when another process is filling it.

    Args:
        conn: an asyncpg connection (not inside a transaction).
        now: the current time (tests); the database's by default.
        backfill: where an empty rollup starts, before ``now``.
        reconcile: how often filled hours are checked for late events.
    """
    async with conn.transaction():
        state = await conn.fetchrow(_STATE + " FOR UPDATE SKIP LOCKED")
        if state is None:
            return None
        await conn.execute(f"SET LOCAL work_mem = '{ACTIVITY_WORK_MEM}'")
        now = now or state["now"]
        target = floor_hour(now - SETTLE)
        start, upto = state["filled_from"], state["filled_upto"]
        prune_id: int = state["prune_id"]
        latest_prune: int = await conn.fetchval("SELECT coalesce(max(id), 0) FROM audit_prunes")
        checked = state["reconciled_at"]
        recounted = 0
        origin = min(floor_hour(now - backfill), target)
        if start is None or upto is None or upto < origin:
            # Empty, or left for longer than the backfill (a service stopped for weeks):
            # start afresh rather than count every hour since.
            for sql in _DELETE:
                await conn.execute(
                    sql, datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
                )
            start = upto = origin
            checked = now
        elif latest_prune > prune_id:
            boundary = await _pending_prune(conn, prune_id)
            if boundary is not None and boundary > start:
                end = min(boundary, upto)
                await _recount(conn, start, end)
                recounted += max(0, (end - start) // HOUR)
        new_hours = max(0, (target - upto) // HOUR)
        if new_hours:
            await _recount(conn, upto, target)
            upto = target
        if checked is None or now - checked >= reconcile:
            recounted += await _reconcile(conn, max(start, upto - RECONCILE_SPAN), upto)
            checked = now
        await conn.execute(
            "UPDATE auth_event_rollup SET filled_from = $1, filled_upto = $2, prune_id = $3, "
            "reconciled_at = $4",
            start, upto, latest_prune, checked,
        )  # fmt: skip
    return FillReport(start, upto, new_hours, recounted)


async def _reconcile(conn: Connection, start: datetime, end: datetime) -> int:
    """Recount the hours of ``[start, end)`` whose event total differs from the rollup's."""
    if start >= end:
        return 0
    events = dict(await conn.fetch(_EVENT_TOTALS, start, end, ORIGIN))
    rolled = dict(await conn.fetch(_ROLLUP_TOTALS, start, end))
    stale = sorted(h for h in events.keys() | rolled.keys() if events.get(h) != rolled.get(h))
    for hour in stale:
        await _recount(conn, hour, hour + HOUR)
    if stale:
        log.info("console: rollup recounted %d hour(s) with late or pruned events", len(stale))
    return len(stale)


async def run(pool: Any, *, interval: float = INTERVAL) -> None:
    """The service's filler: `fill` now and every ``interval`` seconds until cancelled."""
    while True:
        try:
            began = time.monotonic()
            async with pool.acquire() as conn:
                report = await fill(conn)
            if report is not None and time.monotonic() - began > 1.0:  # a backfill
                log.info("console: rollup filled %d hour(s) in %.1f s", report.new_hours,
                         time.monotonic() - began)  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception:  # the overview reads the events meanwhile; try again later
            log.exception("console: filling the overview rollup failed")
        await asyncio.sleep(interval)


@dataclass(frozen=True, slots=True)
class Activity:
    """What the overview shows of a window.

    Attributes:
        rows: counts per bucket by admission, outcome and reason.
        devices: the devices with the most denials, with their counts.
        peers: the peer hosts with the most denials.
        rolled_upto: events before this came from the rollup (``None``: none did).
    """

    rows: list[ActivityRow]
    devices: list[tuple[str, int]]
    peers: list[tuple[str, int]]
    rolled_upto: datetime | None


async def activity(
    conn: Connection,
    *,
    start: datetime,
    end: datetime,
    stride: timedelta,
    top: int = 10,
    use_rollup: bool = True,
) -> Activity:
    """Counts of ``[start, end)`` in buckets of ``stride``: from the rollup for filled hours
    when ``stride`` is whole hours, from the events for the rest; one snapshot.
    ``use_rollup=False`` counts only the events (the benchmark's baseline)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{ACTIVITY_WORK_MEM}'")
        cut = start
        if use_rollup and stride % HOUR == timedelta(0) and start == floor_hour(start):
            state = await conn.fetchrow(_STATE)
            pruned = await _pending_prune(conn, state["prune_id"])
            usable = state["filled_upto"] is not None and state["filled_from"] <= start
            if usable and (pruned is None or pruned <= start):
                cut = min(max(state["filled_upto"], start), end)
        rows: list[ActivityRow] = []
        if cut > start:
            rolled = await conn.fetch(_ROLLUP_ACTIVITY, start, cut, stride, ORIGIN)
            rows = [
                ActivityRow(r["bucket"], r["connection"], r["outcome"], r["reason"], r["n"])
                for r in rolled
            ]
        rows += await live_activity(conn, start=cut, end=end, stride=stride)
        devices = await conn.fetch(_TOP_DENIALS, True, start, cut, end, top)
        peers = await conn.fetch(_TOP_DENIALS, False, start, cut, end, top)
    return Activity(
        rows,
        [(r["value"], r["n"]) for r in devices],
        [(r["value"], r["n"]) for r in peers],
        cut if cut > start else None,
    )
