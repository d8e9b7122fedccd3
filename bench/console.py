"""Benchmark: the audit console's pages over 1,000,000 auth events.

Loads a scratch database (created and dropped here) with synthetic devices, certificates and
chained events generated in SQL (`tests/console/synthetic.py`: ``generate_series``, no rows
cross the wire, hashes computed by PostgreSQL so the chains verify), starts the real
provisioning HTTPS listener on it, logs in to the console and times each page (median and
worst of ``--runs`` requests after a first one, shown apart), then prints the EXPLAIN
(ANALYZE) plans of the main queries (``--explain FILE`` also writes them to a file, for
docs/console.md).

The overview's day and week read the hourly rollup (`provisioning/console/rollup.py`) plus
the hours after its last filled one. The rollup is filled once here (timed: what a first
start after the upgrade does in the background), before the listener starts, so the first
view of each range is what any newly started replica serves: there is no in-process cache
and no warm-up. ``cold overview`` then times each range's aggregation on a fresh
connection, with the rollup and with the events alone (the path before the rollup, and a
reader's fallback while a prune is not yet applied).

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
from provisioning.console import overview, queries, rollup
from provisioning.http.server import build_app, open_service, server_ssl_context
from provisioning.pki.directory import init_pki
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
    upto = await conn.fetchval("SELECT filled_upto FROM auth_event_rollup")
    week_start, week_end, week_stride = overview.window("week", now)
    last_hour = (upto - rollup.HOUR, upto)
    types = list(queries.CONNECTION_TYPES)
    plans: list[tuple[str, str, tuple[Any, ...]]] = [
        (
            "week overview: rollup hours by bucket, admission, outcome, reason",
            rollup._ROLLUP_ACTIVITY,
            (week_start, upto, week_stride, queries.ORIGIN),
        ),
        (
            "week overview: the hours after the rollup, from the events",
            queries._ACTIVITY,
            (upto, week_end, week_stride, queries.ORIGIN, types),
        ),
        (
            "week overview: top devices by denials (rollup + newest hours)",
            rollup._TOP_DENIALS,
            (True, week_start, upto, week_end, 10),
        ),
        (
            "week overview: top peer hosts by denials (rollup + newest hours)",
            rollup._TOP_DENIALS,
            (False, week_start, upto, week_end, 10),
        ),
        (
            "filler: one hour by admission, outcome, reason (rolled back here)",
            rollup._INSERT_ACTIVITY,
            (*last_hour, queries.ORIGIN, types),
        ),
        (
            "filler: one hour of denials by device and peer host (rolled back here)",
            rollup._INSERT_DENIALS,
            (*last_hour, queries.ORIGIN),
        ),
        (
            "filler: late-event check, event totals per hour over 8 days",
            rollup._EVENT_TOTALS,
            (upto - rollup.RECONCILE_SPAN, upto, queries.ORIGIN),
        ),
        ("chain heads (skip scan)", queries._CHAIN_HEADS, ()),
        (
            "expiring certificates",
            """SELECT c.serial, c.device_id, d.fleet, c.not_after,
            count(*) OVER () AS total FROM certificates c JOIN devices d USING (device_id)
            WHERE c.status = 'active' AND c.not_after >= now()
            AND c.not_after < now() + interval '7 days' ORDER BY c.not_after, c.serial
            LIMIT 10""",
            (),
        ),
        (
            "events page, no filter",
            """SELECT * FROM auth_events
            ORDER BY time DESC, id DESC LIMIT 101""",
            (),
        ),
        (
            "events page, reason filter",
            """SELECT * FROM auth_events
            WHERE reason = 'certificate_expired' ORDER BY time DESC, id DESC LIMIT 101""",
            (),
        ),
        (
            "events page, device filter",
            """SELECT * FROM auth_events
            WHERE device_id = 'dev-00017' ORDER BY time DESC, id DESC LIMIT 51""",
            (),
        ),
        (
            "events page, peer host filter",
            """SELECT * FROM auth_events
            WHERE (peer_address = '203.0.113.5' OR peer_address LIKE '203.0.113.5:%'
            OR peer_address LIKE '[203.0.113.5]:%') ORDER BY time DESC, id DESC LIMIT 101""",
            (),
        ),
    ]
    aggregates = (
        queries._ACTIVITY,
        rollup._ROLLUP_ACTIVITY,
        rollup._TOP_DENIALS,
        rollup._INSERT_ACTIVITY,
        rollup._INSERT_DENIALS,
        rollup._EVENT_TOTALS,
    )
    out = []
    for title, sql, args in plans:
        if sql in aggregates:  # as the console runs them
            await conn.execute(f"SET work_mem = '{queries.ACTIVITY_WORK_MEM}'")
        else:
            await conn.execute("RESET work_mem")
        tx = conn.transaction()
        await tx.start()
        try:  # the filler's INSERTs really run under ANALYZE: rolled back
            if sql in (rollup._INSERT_ACTIVITY, rollup._INSERT_DENIALS):
                for delete in rollup._DELETE:  # as `fill` rewrites an hour
                    await conn.execute(delete, *last_hour)
            rows = await conn.fetch(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) " + sql, *args
            )
        finally:
            await tx.rollback()
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
        began = time.perf_counter()
        filled = await rollup.fill(conn)
        assert filled is not None
        print(
            f"rollup backfill, {filled.new_hours} hours (once, in the background at a first "
            f"start): {time.perf_counter() - began:.2f} s"
        )
        await conn.execute("VACUUM (ANALYZE) auth_event_hourly, auth_event_hourly_denials")
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
        await late_and_fill(url)  # last: its "one new hour" fills the current hour
        await conn.close()
    finally:
        admin_conn = await asyncpg.connect(ADMIN_URL)
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


async def cold_overview(url: str, runs: int = 3) -> None:
    """Each range's aggregation on a new connection each time (nothing cached anywhere but
    PostgreSQL's buffers): with the rollup, as the console runs it, and from the events
    alone. Median of ``runs``."""
    print(f"\n{'cold overview (new connection)':<30} {'rollup ms':>10} {'events only ms':>15}")
    for key in overview.RANGES:
        took: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(runs):
            for use_rollup in (True, False):
                conn = await asyncpg.connect(url)
                try:
                    now = await conn.fetchval("SELECT now()")
                    start, end, stride = overview.window(key, now)
                    began = time.perf_counter()
                    await rollup.activity(conn, start=start, end=end, stride=stride,
                                          use_rollup=use_rollup)  # fmt: skip
                    took[use_rollup].append((time.perf_counter() - began) * 1000)
                finally:
                    await conn.close()
        print(
            f"{key:<30} {statistics.median(took[True]):>10.1f} "
            f"{statistics.median(took[False]):>15.1f}"
        )


async def late_and_fill(url: str) -> None:
    """What the service's filler costs per run: nothing to do, one new hour, and a
    late-event check over 8 days."""
    conn = await asyncpg.connect(url)
    try:
        hour_later = await conn.fetchval("SELECT now() + interval '1 hour'")
        for title, options in (
            ("fill, nothing new", {}),
            ("fill + late-event check (8 days)", {"reconcile": timedelta(0)}),
            ("fill, one new hour", {"now": hour_later, "reconcile": timedelta(days=1)}),
        ):
            began = time.perf_counter()
            await rollup.fill(conn, **options)
            print(f"{title:<40} {(time.perf_counter() - began) * 1000:>8.1f} ms")
    finally:
        await conn.close()


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
                else:  # the first: a fresh process's first view of the page
                    first = elapsed
                size = len(body)
            print(
                f"{title:<30} {first:>9.1f} {statistics.median(times):>10.1f} "
                f"{max(times):>10.1f} {size:>10,}"
            )
        async with client.get("/console/chains") as response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())
        assert csrf
        began = time.perf_counter()
        async with client.post(
            "/console/chains/verify", data={"csrf": csrf.group(1), "window": "day"}
        ) as response:
            await response.read()
        while True:
            async with client.get("/console/chains") as response:
                text = await response.text()
            if 'id="verify-summary"' in text or "failed" in text:
                break
            await asyncio.sleep(0.5)
        found = re.search(r'id="verify-summary">([^<]+)<', text)
        print(
            f"\nchain verification, last day (background): "
            f"{time.perf_counter() - began:.1f} s: {found.group(1) if found else text[-300:]}"
        )


if __name__ == "__main__":
    uvloop.run(main())
