"""Per-process cache of the overview's closed time buckets.

A week holds every event of the week: aggregating a million rows per page view is too slow.
Closed buckets barely change, so each is aggregated once and kept; a page view queries only
the buckets closed since, and the open one.

Invariants:
- A bucket is cached only once it ended at least `SETTLE` ago (group commit and spool
  shipping have landed its events); the newer ones are always read live.
- Events stored late with old times (a gateway replaying its spool after an outage) land in
  closed buckets: every entry is recomputed in the background once older than `REFRESH`,
  while the old one keeps serving (stale-while-revalidate), so such events show within
  `REFRESH` and no page waits for the recompute.
- Only the very first view of a range in a process pays the whole window, and the console
  warms every range in the background as soon as it starts (`warm`), so that view usually
  finds the cache ready; a view arriving meanwhile waits for the warm-up's query (single
  flight) instead of starting its own.
- A cold window is aggregated a day per query, up to `PARALLEL` queries at a time on their
  own connections (a day-query runs on one core: the planner picks no parallel plan for
  it, and none is possible for the denials' grouping sets).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from provisioning.console.queries import ORIGIN, BucketCounts, activity

log = logging.getLogger("devicegate.console")

Window = tuple[datetime, datetime, timedelta]
"""start, end, stride of a window of buckets."""

SETTLE = timedelta(minutes=2)
CHUNK = timedelta(days=1)
PARALLEL = 4
"""Day-chunk queries run at once for a cold window (each holds a pool connection)."""
REFRESH = 600.0
"""Seconds after which an entry is recomputed in the background."""


def floor(moment: datetime, stride: timedelta) -> datetime:
    return ORIGIN + ((moment - ORIGIN) // stride) * stride


@dataclass(slots=True)
class _Entry:
    start: datetime
    upto: datetime
    computed: float
    buckets: dict[datetime, BucketCounts] = field(default_factory=dict)
    refreshing: asyncio.Task[None] | None = None


class ActivityCache:
    """Closed buckets per stride; `window` returns every bucket of ``[start, end)``."""

    def __init__(self, *, refresh: float = REFRESH, settle: timedelta = SETTLE) -> None:
        self.refresh = refresh
        self.settle = settle
        self._entries: dict[timedelta, _Entry] = {}
        self._locks: dict[timedelta, asyncio.Lock] = {}

    async def window(
        self, pool: Any, *, start: datetime, end: datetime, stride: timedelta, now: datetime
    ) -> dict[datetime, BucketCounts]:
        closed = max(start, floor(now - self.settle, stride))
        lock = self._locks.setdefault(stride, asyncio.Lock())
        async with lock:  # one computation per stride at a time (single flight)
            entry = self._entries.get(stride)
            if entry is None or entry.start > start or entry.upto < start:
                entry = _Entry(start, closed, time.monotonic(),
                               await self._query(pool, start, closed, stride))  # fmt: skip
                self._entries[stride] = entry
            elif time.monotonic() - entry.computed > self.refresh and entry.refreshing is None:
                entry.refreshing = asyncio.create_task(
                    self._recompute(pool, stride, entry), name="console-activity-refresh"
                )
            if entry.upto < closed:
                entry.buckets.update(await self._query(pool, entry.upto, closed, stride))
                entry.upto = closed
            for old in [b for b in entry.buckets if b < start]:
                del entry.buckets[old]
            entry.start = start
            cached = {b: c for b, c in entry.buckets.items() if start <= b < closed}
        live = await self._query(pool, closed, end, stride)
        return {**cached, **live}

    async def _recompute(self, pool: Any, stride: timedelta, entry: _Entry) -> None:
        try:
            began = time.monotonic()
            start, upto = entry.start, entry.upto
            fresh = await self._query(pool, start, upto, stride)
            async with self._locks[stride]:
                current = self._entries.get(stride)
                if current is entry:
                    entry.buckets.update(fresh)
                    for stale in [b for b in entry.buckets if start <= b < upto and b not in fresh]:
                        del entry.buckets[stale]
                    entry.computed = began
        except Exception:  # the old entry keeps serving; the next view tries again
            log.exception("console: refreshing the overview cache failed")
        finally:
            entry.refreshing = None

    @staticmethod
    async def _query(
        pool: Any, start: datetime, end: datetime, stride: timedelta
    ) -> dict[datetime, BucketCounts]:
        """Aggregated a day of buckets per query: each stays small enough to hash in memory
        (a whole week in one query makes PostgreSQL sort a million rows instead); the
        queries of a window run concurrently, `PARALLEL` at a time."""
        chunk = max(1, CHUNK // stride) * stride
        spans: list[tuple[datetime, datetime]] = []
        while start < end:
            spans.append((start, min(end, start + chunk)))
            start = spans[-1][1]
        gate = asyncio.Semaphore(PARALLEL)

        async def one(lo: datetime, hi: datetime) -> dict[datetime, BucketCounts]:
            async with gate, pool.acquire() as conn:
                return await activity(conn, start=lo, end=hi, stride=stride)

        out: dict[datetime, BucketCounts] = {}
        for part in await asyncio.gather(*(one(lo, hi) for lo, hi in spans)):
            out.update(part)
        return out


async def warm(
    cache: ActivityCache, pool: Any, windows: Callable[[datetime], list[Window]]
) -> None:
    """Fill the cache for every window (the overview's ranges) in the background, so the
    first view of each finds it ready. A failure is logged: views then compute on demand."""
    try:
        async with pool.acquire() as conn:
            now: datetime = await conn.fetchval("SELECT now()")
        began = time.monotonic()
        for start, end, stride in windows(now):
            await cache.window(pool, start=start, end=end, stride=stride, now=now)
        log.info("console: overview cache warmed in %.1f s", time.monotonic() - began)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("console: warming the overview cache failed")
