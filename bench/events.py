"""Benchmark: auth events through `SpoolSink` into PostgreSQL, beside two baselines.

Prints, from one run against a scratch database (created and dropped here):

- ``insert``: one INSERT (one transaction) per event, rows precomputed;
- ``copy``: raw ``copy_records_to_table`` in batches of 500, rows precomputed;
- ``sink``: `SpoolSink.record` from many concurrent producers, timed from the first record
  until the last event is committed (chaining, spool fsync and shipping included), with
  the latency of each ``record`` call (p50/p99);
- ``sink-paced``: ``record`` latency at a steady rate (an admission storm, not a flood):
  what a CONNECT waits before its CONNACK.

The sink rows also print this process's CPU time per event (event loop and spool threads,
not PostgreSQL's): unlike rates, it stays comparable on a busy machine.

Raw COPY and the sink each run once untimed (a warm-up: connections, the first spool
segments, PostgreSQL's caches), then alternate ``--repeat`` times (default 5) and print
medians, with the ratio of each pair. Targets: sink >= 0.8x copy; record p99 <= 5 ms. Runs
in about a minute.

Usage: .venv/bin/python bench/events.py [--events 50000] [--repeat 5] [--producers 200]
       [--rate 2000]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from gateway.events.codec import ACCELERATED, COLUMNS, encode_event
from gateway.events.sink import SpoolSink
from schemas.events import AuthEvent, EventType, Outcome, Reason
from schemas.migrate import migrate

ADMIN_URL = os.environ.get(
    "DEVICEGATE_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def make_events(count: int) -> list[AuthEvent]:
    return [
        AuthEvent(
            instance="bench-gw",
            type=EventType.CONNECT,
            outcome=Outcome.ALLOWED if i % 10 else Outcome.DENIED,
            reason=Reason.OK if i % 10 else Reason.CERTIFICATE_EXPIRED,
            device_id=f"dev-{i % 5000:05d}",
            fleet="line-a",
            cert_serial=f"{i:x}",
            cert_fingerprint="ab" * 32,
            client_id=f"dev-{i % 5000:05d}",
            peer_address=f"10.0.{i % 250}.7:{40000 + i % 1000}",
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_128_GCM_SHA256",
            detail={"protocol": 5, "keepalive": 60},
        )
        for i in range(count)
    ]


def rows_of(events: Sequence[AuthEvent], chain_id: str) -> list[tuple[Any, ...]]:
    """The COPY rows of ``events`` chained on ``chain_id`` (precomputed for the baselines)."""
    rows = []
    prev = bytes(32)
    for seq, event in enumerate(events, 1):
        _, prev, row = encode_event(event, chain_id=chain_id, seq=seq, prev_digest=prev)
        rows.append(row)
    return rows


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench_insert(
    conn: asyncpg.Connection, rows: list[tuple[Any, ...]], seconds: float
) -> float:
    columns = ", ".join(COLUMNS)
    marks = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
    statement = f"INSERT INTO auth_events ({columns}) VALUES ({marks})"
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    for row in rows:
        await conn.execute(statement, *row)
        done += 1
        if time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - started)


async def bench_copy(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> float:
    started = time.perf_counter()
    for start in range(0, len(rows), 500):
        await conn.copy_records_to_table(
            "auth_events", records=rows[start : start + 500], columns=COLUMNS
        )
    return len(rows) / (time.perf_counter() - started)


async def bench_copy_chained(conn: asyncpg.Connection, events: list[AuthEvent]) -> float:
    """Raw COPY in batches of 500, chain hashes computed inside the timing: the least any
    sink must do (no spool, no fsync, no per-event task)."""
    started = time.perf_counter()
    prev = bytes(32)
    for start in range(0, len(events), 500):
        rows = []
        for seq, event in enumerate(events[start : start + 500], start + 1):
            _, prev, row = encode_event(event, chain_id="bench/chained", seq=seq, prev_digest=prev)
            rows.append(row)
        await conn.copy_records_to_table("auth_events", records=rows, columns=COLUMNS)
    return len(events) / (time.perf_counter() - started)


def fsync_floor(directory: Path, count: int = 400) -> list[float]:
    """Latency of a bare 1 KiB overwrite + fdatasync in the spool's directory: the floor
    under any durable ``record``."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(count * 1024), 0)
        os.fsync(fd)
        latencies = []
        for index in range(count):
            began = time.perf_counter()
            os.pwrite(fd, b"x" * 1024, index * 1024)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - began)
            time.sleep(0.001)
        return latencies
    finally:
        os.close(fd)
        path.unlink()


async def bench_sink(
    url: str, spool_dir: Path, events: list[AuthEvent], producers: int, ship_interval: float
) -> tuple[float, list[float], Any, float]:
    latencies: list[float] = []
    queue = iter(events)
    async with SpoolSink(
        database_url=url, spool_dir=spool_dir, chain_id="bench/flood", ship_interval=ship_interval
    ) as sink:

        async def produce() -> None:
            for event in queue:
                began = time.perf_counter()
                await sink.record(event)
                latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        cpu = time.process_time()
        await asyncio.gather(*(produce() for _ in range(producers)))
        await sink.drained()  # the last event is committed (close's segment rotation is not)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    return len(events) / elapsed, latencies, sink.stats, cpu / len(events)


async def bench_paced(
    url: str, spool_dir: Path, events: list[AuthEvent], rate: float, ship_interval: float
) -> tuple[list[float], Any, float]:
    latencies: list[float] = []
    async with SpoolSink(
        database_url=url, spool_dir=spool_dir, chain_id="bench/paced", ship_interval=ship_interval
    ) as sink:

        async def one(event: AuthEvent) -> None:
            began = time.perf_counter()
            await sink.record(event)
            latencies.append(time.perf_counter() - began)

        tasks = []
        started = time.perf_counter()
        cpu = time.process_time()
        for index, event in enumerate(events):
            due = started + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(event)))
        # Only the unfinished ones: gathering all 8,000 would stall the loop ~25 ms and
        # charge that to the last records' latency.
        await asyncio.gather(*(task for task in tasks if not task.done()))
        cpu = time.process_time() - cpu
    return latencies, sink.stats, cpu / len(events)


async def main(args: argparse.Namespace) -> None:
    name = f"dg_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{ADMIN_URL.rpartition('/')[0]}/{name}"
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        events = make_events(args.events)
        rows = rows_of(events, "bench/baseline")
        # The prebuilt events and rows stay alive for the whole run; in the gateway an event
        # lives only while it is recorded. Out of the GC's generations, as the gateway's
        # start-up state is (gc.freeze in its worker), so no collection walks them.
        gc.freeze()
        print(f"{args.events} events, {len(COLUMNS)} columns, 6 indexes + PK, PostgreSQL "
              f"{conn.get_server_version().major}, {os.cpu_count()} CPUs, event encoder "
              f"{'in C' if ACCELERATED else 'in Python (C accelerator not built)'}")  # fmt: skip

        insert_rate = await bench_insert(conn, rows, seconds=args.insert_seconds)
        await conn.execute("TRUNCATE auth_events")
        chained_rate = await bench_copy_chained(conn, events)
        await conn.execute("TRUNCATE auth_events")
        # Raw COPY and the sink alternate, and each figure is the median of its runs: one
        # run of either moves by a third on this VM (checkpoints, the scheduler).
        copy_rates, sink_runs = [], []
        with tempfile.TemporaryDirectory(dir=args.spool_dir) as spool:
            warm = min(len(events), 10_000)
            await bench_copy(conn, rows[:warm])
            await conn.execute("TRUNCATE auth_events")
            await bench_sink(
                url, Path(spool) / "warm-up", events[:warm], args.producers, args.ship_interval
            )
            await conn.execute("TRUNCATE auth_events")
            for run in range(args.repeat):
                copy_rates.append(await bench_copy(conn, rows))
                await conn.execute("TRUNCATE auth_events")
                sink_runs.append(
                    await bench_sink(
                        url,
                        Path(spool) / f"flood-{run}",
                        events,
                        args.producers,
                        args.ship_interval,
                    )
                )
                stored = await conn.fetchval("SELECT count(*) FROM auth_events")
                assert stored == args.events, f"sink stored {stored} of {args.events}"
                await conn.execute("TRUNCATE auth_events")
            paced_count = int(args.rate * args.paced_seconds)
            paced, paced_stats, paced_cpu = await bench_paced(
                url, Path(spool) / "paced", make_events(paced_count), args.rate, args.ship_interval
            )
            floor = fsync_floor(Path(spool))
        copy_rate = statistics.median(copy_rates)
        sink_rate, latencies, stats, sink_cpu = sorted(sink_runs, key=lambda r: r[0])[
            len(sink_runs) // 2
        ]  # the median run, with its own latencies and counters
        ratios = " ".join(f"{s[0] / c:.2f}" for c, s in zip(copy_rates, sink_runs, strict=True))

        ms = 1000.0
        print(f"{'method':<12} {'events/s':>10} {'vs copy':>8}   record latency")
        print(f"{'insert':<12} {insert_rate:>10.0f} {insert_rate / copy_rate:>7.2f}x")
        print(f"{'copy (500)':<12} {copy_rate:>10.0f} {1.0:>7.2f}x")
        print(
            f"{'copy+chain':<12} {chained_rate:>10.0f} {chained_rate / copy_rate:>7.2f}x"
            "   (same, hashing the chain inside the timing)"
        )
        print(
            f"{'sink':<12} {sink_rate:>10.0f} {sink_rate / copy_rate:>7.2f}x   "
            f"p50 {percentile(latencies, 0.5) * ms:.2f} ms, "
            f"p99 {percentile(latencies, 0.99) * ms:.2f} ms "
            f"({args.producers} producers; {stats.fsyncs} fsyncs, {stats.batches} batches; "
            f"CPU {sink_cpu * 1e6:.0f} us/event)"
        )
        print(f"{'':<12} {'':>10} {'':>8}   median of {args.repeat} alternating runs; "
              f"sink/copy per run: {ratios}")  # fmt: skip
        print(
            f"{'sink-paced':<12} {args.rate:>10.0f} {'':>8}   "
            f"p50 {percentile(paced, 0.5) * ms:.2f} ms, p99 {percentile(paced, 0.99) * ms:.2f} ms, "
            f"max {max(paced) * ms:.2f} ms, mean {statistics.fmean(paced) * ms:.2f} ms "
            f"({len(paced)} records; {paced_stats.fsyncs} fsyncs; "
            f"CPU {paced_cpu * 1e6:.0f} us/event)"
        )
        print(
            f"{'fdatasync':<12} {'':>10} {'':>8}   p50 {percentile(floor, 0.5) * ms:.2f} ms, "
            f"p99 {percentile(floor, 0.99) * ms:.2f} ms (bare 1 KiB write + fdatasync, "
            "the floor under record)"
        )
        verdict = sink_rate >= 0.8 * copy_rate and percentile(paced, 0.99) <= 0.005
        print(f"targets (sink >= 0.8x copy, paced p99 <= 5 ms): {'met' if verdict else 'MISSED'}")
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5, help="alternating copy/sink runs")
    parser.add_argument("--producers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2000.0, help="paced records per second")
    parser.add_argument("--paced-seconds", type=float, default=4.0)
    parser.add_argument("--insert-seconds", type=float, default=4.0)
    parser.add_argument("--ship-interval", type=float, default=0.025)
    parser.add_argument(
        "--spool-dir", default=None, help="where the spool goes (default: the temp dir)"
    )
    import uvloop

    uvloop.run(main(parser.parse_args()))
