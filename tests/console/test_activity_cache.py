"""The overview's bucket cache: the same numbers as the table, and late events picked up by
the background refresh."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import asyncpg

from provisioning.console.activity_cache import ActivityCache, floor
from schemas.events import GENESIS_HASH, AuthEvent, EventType, Outcome, Reason
from tests.console.conftest import ConsoleServer

STRIDE = timedelta(minutes=30)
SPAN = timedelta(days=12)
"""The window here: longer than any overview range, so the late event below (10 days old)
lands outside them all and the running console's cache (warmed at startup) still matches
the table for the other tests."""


async def _totals(cache: ActivityCache, pool: asyncpg.Pool) -> tuple[int, dict[str, int]]:
    async with pool.acquire() as conn:
        now = await conn.fetchval("SELECT now()")
    end = floor(now, STRIDE) + STRIDE
    buckets = await cache.window(pool, start=end - SPAN, end=end, stride=STRIDE,
                                 now=now)  # fmt: skip
    devices: dict[str, int] = {}
    for counts in buckets.values():
        for device, n in counts.devices.items():
            devices[device] = devices.get(device, 0) + n
    return sum(r.count for c in buckets.values() for r in c.rows), devices


async def test_cached_windows_match_the_table_and_catch_late_events(
    console_server: ConsoleServer,
) -> None:
    pool = await asyncpg.create_pool(console_server.database_url, min_size=1, max_size=2)
    try:
        cache = ActivityCache(refresh=3600)
        total, devices = await _totals(cache, pool)
        async with pool.acquire() as conn:
            now = await conn.fetchval("SELECT now()")
            start = floor(now, STRIDE) + STRIDE - SPAN
            expected = await conn.fetchval("SELECT count(*) FROM auth_events WHERE time >= $1",
                                           start)  # fmt: skip
            denied = dict(await conn.fetch(
                "SELECT device_id, count(*) FROM auth_events WHERE time >= $1 "
                "AND outcome = 'denied' AND device_id IS NOT NULL GROUP BY 1", start))  # fmt: skip
        assert total == expected and devices == denied
        assert await _totals(cache, pool) == (total, devices)  # served from the cache

        # A gateway replays an old event from its spool: a closed bucket changes.
        late = AuthEvent(
            time=start + timedelta(days=2), instance="late-gw", type=EventType.CONNECT,
            outcome=Outcome.DENIED, reason=Reason.RATE_LIMITED, device_id="late-device",
        ).chained(chain_id="late-gw/w0", seq=1, prev_hash=GENESIS_HASH)  # fmt: skip
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, "
                "detail, chain_id, seq, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "$8::jsonb, $9, $10, $11, $12)",
                late.id, late.time, late.instance, str(late.type), str(late.outcome),
                str(late.reason), late.device_id, json.dumps(late.detail), late.chain_id,
                late.seq, late.prev_hash, late.hash,
            )  # fmt: skip
        assert (await _totals(cache, pool))[0] == total  # not yet: the bucket is cached
        cache.refresh = 0  # now stale: the next view serves it and refreshes behind
        await _totals(cache, pool)
        for _ in range(100):
            if all(e.refreshing is None for e in cache._entries.values()):
                break
            await asyncio.sleep(0.05)
        total_after, devices_after = await _totals(cache, pool)
        assert total_after == total + 1 and devices_after["late-device"] == 1
    finally:
        await pool.close()
