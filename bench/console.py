"""Benchmark: the audit console's pages over 1,000,000 auth events.

Loads a scratch database (created and dropped here) with synthetic devices, certificates and
chained events generated in SQL (`tests/console/synthetic.py`: ``generate_series``, no rows
cross the wire, hashes computed by PostgreSQL so the chains verify), starts the real
provisioning HTTPS listener on it, logs in to the console and times each page (median and
worst of ``--runs`` requests after a first, cold one, shown apart: the overview caches
closed time buckets, so only a process's first view of a range aggregates the whole
window), then prints the EXPLAIN (ANALYZE) plans of the main queries (``--explain FILE``
also writes them to a file, for docs/console.md).

Target: every page well under a second (the chain verification is a background job and is
timed separately: it rehashes every event of its window).

Usage: .venv/bin/python bench/console.py [--events 1000000] [--runs 5] [--explain FILE]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import ssl
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provisioning import admin
from provisioning.ca import init_pki
from provisioning.console import activity_cache, overview, queries
from provisioning.server import build_app, open_service, server_ssl_context
from schemas.migrate import migrate
from schemas.settings import Settings
from tests.console.synthetic import load

ADMIN_URL = os.environ.get(
    "DEVICEGATE_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PASSPHRASE = "bench-passphrase-not-secret"

PAGES = [
    ("overview, last hour", "/console/?range=hour"),
    ("overview, last day", "/console/?range=day"),
    ("overview, last week", "/console/?range=week"),
    ("events, no filter", "/console/events"),
    ("events, reason", "/console/events?reason=certificate_expired"),
    ("events, denied + since 1h", "/console/events?outcome=denied&since=1h"),
    ("events, device", "/console/events?device=dev-00017"),
    ("events, peer host", "/console/events?peer=203.0.113.5"),
    ("events, rare reason", "/console/events?reason=rate_limited&type=connect"),
    ("device page", "/console/devices/dev-00017"),
    ("chains page (no run)", "/console/chains"),
    ("export csv, 10,000", "/console/events/export.csv?limit=10000"),
    ("export json, 10,000 denied", "/console/events/export.json?outcome=denied&limit=10000"),
]


def _url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def serve(settings: Settings, port: int) -> tuple[threading.Thread, Any, dict[str, Any]]:
    loop = uvloop.new_event_loop()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        service = await open_service(settings)
        runner = web.AppRunner(build_app(service), access_log=None, handle_signals=False,
                               shutdown_timeout=5)  # fmt: skip
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port,
                           ssl_context=server_ssl_context(settings.pki_dir))  # fmt: skip
        await site.start()
        state["stop"] = asyncio.Event()
        started.set()
        await state["stop"].wait()
        await runner.cleanup()
        await service.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("provisioning did not start")
    return thread, loop, state


async def explain(conn: asyncpg.Connection) -> str:
    now = await conn.fetchval("SELECT now()")
    day = (now - timedelta(days=1), now)
    plans = [
        ("activity, one day of buckets (a cold cache aggregates a day per query)",
         queries._ACTIVITY,
         (*day, timedelta(minutes=30), queries.ORIGIN, list(queries.CONNECTION_TYPES))),
        ("activity denials, one day of buckets (the second query of each chunk)",
         queries._DENIALS, (*day, timedelta(minutes=30), queries.ORIGIN)),
        ("activity, newest buckets only (warm cache)", queries._ACTIVITY,
         (now - timedelta(minutes=5), now + timedelta(hours=3), timedelta(hours=3),
          queries.ORIGIN, list(queries.CONNECTION_TYPES))),
        ("chain heads (skip scan)", queries._CHAIN_HEADS, ()),
        ("expiring certificates", """SELECT c.serial, c.device_id, d.fleet, c.not_after,
            count(*) OVER () AS total FROM certificates c JOIN devices d USING (device_id)
            WHERE c.status = 'active' AND c.not_after >= now()
            AND c.not_after < now() + interval '7 days' ORDER BY c.not_after, c.serial
            LIMIT 10""", ()),
        ("events page, no filter", """SELECT * FROM auth_events
            ORDER BY time DESC, id DESC LIMIT 101""", ()),
        ("events page, reason filter", """SELECT * FROM auth_events
            WHERE reason = 'certificate_expired' ORDER BY time DESC, id DESC LIMIT 101""", ()),
        ("events page, device filter", """SELECT * FROM auth_events
            WHERE device_id = 'dev-00017' ORDER BY time DESC, id DESC LIMIT 51""", ()),
        ("events page, peer host filter", """SELECT * FROM auth_events
            WHERE (peer_address = '203.0.113.5' OR peer_address LIKE '203.0.113.5:%'
            OR peer_address LIKE '[203.0.113.5]:%') ORDER BY time DESC, id DESC LIMIT 101""",
         ()),
    ]
    out = []
    for title, sql, args in plans:
        if sql in (queries._ACTIVITY, queries._DENIALS):  # as the console runs it
            await conn.execute(f"SET work_mem = '{queries.ACTIVITY_WORK_MEM}'")
        else:
            await conn.execute("RESET work_mem")
        rows = await conn.fetch("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) " + sql,
                                *args)  # fmt: skip
        text = "\n".join(r[0] for r in rows)
        text = re.sub(r"auth_events_\d{4}_\d{2}", "auth_events_YYYY_MM", text)
        out.append(f"-- {title}\n{text}\n")
    return "\n".join(out)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--explain", type=Path)
    options = parser.parse_args()

    name = f"dg_bench_console_{secrets.token_hex(4)}"
    admin_conn = await asyncpg.connect(ADMIN_URL)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    await admin_conn.close()
    url = _url(name)
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        seconds = await load(conn, events=options.events)
        print(f"loaded {options.events:,} events (+ registry, vacuum, analyze) in {seconds:.1f} s")
        key = (await admin.create_admin_key(conn, "bench", actor="cli", instance="bench")).key
        with tempfile.TemporaryDirectory() as pki:
            init_pki(Path(pki), passphrase=PASSPHRASE.encode(), force=True)
            settings = Settings(database_url=url, pki_dir=Path(pki), ca_passphrase=PASSPHRASE,
                                instance_id="bench")  # fmt: skip
            port = 20000 + secrets.randbelow(20000)
            thread, loop, state = serve(settings, port)
            try:
                await run_pages(port, Path(pki) / "chain.pem", key, options.runs)
            finally:
                loop.call_soon_threadsafe(state["stop"].set)
                thread.join(15)
        await cold_overview(url)
        plans = await explain(conn)
        print("\n== EXPLAIN (ANALYZE) of the main queries\n" + plans)
        if options.explain:
            options.explain.write_text(plans)
        await conn.close()
    finally:
        admin_conn = await asyncpg.connect(ADMIN_URL)
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


async def cold_overview(url: str) -> None:
    """The overview's cold path alone (what a first view pays if it comes before the startup
    warm-up is done): a fresh cache per range, day chunks one at a time (as before) and
    `activity_cache.PARALLEL` at a time (as the console runs them)."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=16)
    parallel = activity_cache.PARALLEL
    try:
        async with pool.acquire() as conn:
            now = await conn.fetchval("SELECT now()")
        print(f"\n{'cold overview (no cache)':<30} {'serial ms':>10} {'parallel ms':>12}")
        for key in overview.RANGES:
            start, end, stride = overview.window(key, now)
            took = []
            for at_once in (1, parallel):
                activity_cache.PARALLEL = at_once
                began = time.perf_counter()
                await activity_cache.ActivityCache().window(
                    pool, start=start, end=end, stride=stride, now=now
                )
                took.append((time.perf_counter() - began) * 1000)
            print(f"{key:<30} {took[0]:>10.1f} {took[1]:>12.1f}")
    finally:
        activity_cache.PARALLEL = parallel
        await pool.close()


async def run_pages(port: int, chain: Path, key: str, runs: int) -> None:
    context = ssl.create_default_context(cafile=str(chain))
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(
        base_url=f"https://127.0.0.1:{port}", connector=aiohttp.TCPConnector(ssl=context),
        cookie_jar=jar,
    ) as client:  # fmt: skip
        async with client.get("/console/login") as response:
            token = re.search(r'name="csrf" value="([^"]+)"', await response.text())
        assert token
        async with client.post("/console/login", data={"key": key, "csrf": token.group(1)}) as r:
            assert r.status == 200, r.status
        print(f"\n{'page':<30} {'first ms':>9} {'median ms':>10} {'worst ms':>10} {'bytes':>10}")
        for title, path in PAGES:
            times = []
            first = 0.0
            size = 0
            for attempt in range(runs + 1):
                began = time.perf_counter()
                async with client.get(path) as response:
                    body = await response.read()
                    assert response.status == 200, (path, response.status)
                elapsed = (time.perf_counter() - began) * 1000
                if attempt:
                    times.append(elapsed)
                else:  # the first: cold caches (the overview's buckets included)
                    first = elapsed
                size = len(body)
            print(f"{title:<30} {first:>9.1f} {statistics.median(times):>10.1f} "
                  f"{max(times):>10.1f} {size:>10,}")
        async with client.get("/console/chains") as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())
        assert csrf
        began = time.perf_counter()
        async with client.post("/console/chains/verify",
                               data={"csrf": csrf.group(1), "window": "day"}) as response:
            await response.read()
        while True:
            async with client.get("/console/chains") as response:
                text = await response.text()
            if 'id="verify-summary"' in text or "failed" in text:
                break
            await asyncio.sleep(0.5)
        found = re.search(r'id="verify-summary">([^<]+)<', text)
        print(f"\nchain verification, last day (background): "
              f"{time.perf_counter() - began:.1f} s: {found.group(1) if found else text[-300:]}")


if __name__ == "__main__":
    uvloop.run(main())
