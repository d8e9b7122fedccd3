"""SpoolSink against the real PostgreSQL: exactly-once delivery, group commit, crash
recovery (kill -9), an outage through a cut TCP proxy, and the bounded spool."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.events.interface import EventLogUnavailable
from gateway.events.sink import SpoolSink
from provisioning.audit.verify import verify_chains
from schemas.events import AuthEvent, Reason, uuid7
from schemas.notify import EVENTS_CHANNEL

ROOT = Path(__file__).resolve().parents[2]


async def _stored(conn: asyncpg.Connection, chain_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, seq FROM auth_events WHERE chain_id = $1 ORDER BY seq", chain_id
    )
    return rows


async def test_every_recorded_event_lands_once_and_the_chain_verifies(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    chain = f"gw-once/{uuid7().hex[:8]}"
    notices: list[str] = []
    await db.add_listener(EVENTS_CHANNEL, lambda *args: notices.append(args[3]))
    recorded = [events(i) for i in range(500)]
    async with SpoolSink(
        database_url=database_url, spool_dir=tmp_path / "s", chain_id=chain
    ) as sink:
        await asyncio.gather(*(sink.record(event) for event in recorded))
    rows = await _stored(db, chain)
    assert sorted(str(r["id"]) for r in rows) == sorted(str(e.id) for e in recorded)
    assert [r["seq"] for r in rows] == list(range(1, 501))
    report = await verify_chains(db, chain_id=chain)
    assert report.ok and report.events == 500, report.findings
    assert sink.stats.queue_depth == 0 and sink.stats.events_shipped == 500
    await asyncio.sleep(0.05)
    assert any(chain in notice for notice in notices)


async def test_drained_returns_once_everything_recorded_is_committed(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    chain = f"gw-drained/{uuid7().hex[:8]}"
    async with SpoolSink(
        database_url=database_url, spool_dir=tmp_path / "s", chain_id=chain, ship_interval=0.2
    ) as sink:
        for round_ in range(3):
            await asyncio.gather(*(sink.record(events(round_ * 100 + i)) for i in range(100)))
            await sink.drained()  # the partial batch waited 0.2 s for company, then shipped
            assert len(await _stored(db, chain)) == (round_ + 1) * 100
            assert sink.stats.queue_depth == 0


async def test_concurrent_records_share_few_fsyncs(
    database_url: str, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    chain = f"gw-group/{uuid7().hex[:8]}"
    async with SpoolSink(
        database_url=database_url, spool_dir=tmp_path / "s", chain_id=chain
    ) as sink:
        for round_ in range(5):
            await asyncio.gather(*(sink.record(events(round_ * 200 + i)) for i in range(200)))
        stats = sink.stats
    assert stats.events_recorded == 1000
    assert stats.fsyncs <= 10, stats  # 1000 concurrent records, a handful of fsyncs


async def test_a_restarted_sink_continues_its_chain(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    chain = f"gw-restart/{uuid7().hex[:8]}"
    for start in range(3):
        async with SpoolSink(
            database_url=database_url, spool_dir=tmp_path / "s", chain_id=chain
        ) as sink:
            for i in range(10):
                await sink.record(events(start * 10 + i))
    assert [r["seq"] for r in await _stored(db, chain)] == list(range(1, 31))
    # A wiped spool directory never continues the chain from PostgreSQL's head (which the
    # database alone vouches for): it begins a new chain whose genesis names that head.
    for path in (tmp_path / "s").iterdir():
        path.unlink()
    async with SpoolSink(
        database_url=database_url, spool_dir=tmp_path / "s", chain_id=chain
    ) as sink:
        await sink.record(events(99))
        new_chain = sink.chain_id
    assert new_chain.startswith(f"{chain}#")
    assert (await _stored(db, chain))[-1]["seq"] == 30
    assert [r["seq"] for r in await _stored(db, new_chain)] == [1]
    genesis = await db.fetchrow("SELECT * FROM audit_chains WHERE chain_id = $1", new_chain)
    assert (genesis["reason"], genesis["previous_chain"], genesis["previous_seq"]) == (
        "new_spool", chain, 30,
    )  # fmt: skip
    assert (await verify_chains(db, chain_id=chain)).ok
    assert (await verify_chains(db, chain_id=new_chain)).ok


async def test_kill_9_loses_no_acknowledged_event(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    chain = f"gw-kill/{uuid7().hex[:8]}"
    spool_dir = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.events.sink_child", database_url, str(spool_dir), chain],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    acknowledged: list[str] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        acknowledged.append(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    acknowledged += [line.strip() for line in child.stdout.read().splitlines()]
    child.wait()
    acknowledged = [a for a in acknowledged if a]
    assert len(acknowledged) > 100

    async with SpoolSink(database_url=database_url, spool_dir=spool_dir, chain_id=chain) as sink:
        pass
    assert sink.stats.queue_depth == 0
    rows = await _stored(db, chain)
    stored = [str(r["id"]) for r in rows]
    assert len(stored) == len(set(stored))
    assert set(acknowledged) <= set(stored)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_an_outage_is_ridden_out_and_every_event_lands_once(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
    proxy_to: Callable[[str], Any],
) -> None:
    proxy, url = await proxy_to(database_url)
    chain = f"gw-outage/{uuid7().hex[:8]}"
    recorded: list[AuthEvent] = []
    async with SpoolSink(
        database_url=url,
        spool_dir=tmp_path / "s",
        chain_id=chain,
        retry_max=0.2,
        connect_timeout=1.0,
    ) as sink:

        async def produce(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                event = events(len(recorded))
                await sink.record(event)
                recorded.append(event)
                await asyncio.sleep(0.002)

        await produce(0.3)
        await proxy.cut()
        await produce(2.0)  # PostgreSQL unreachable: recording goes on
        assert sink.stats.ship_failures > 0 and sink.stats.queue_depth > 0
        await proxy.restore()
        await produce(0.3)
    rows = await _stored(db, chain)
    assert [str(r["id"]) for r in rows] == [str(e.id) for e in recorded]
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_a_full_spool_refuses_then_recovers(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
    proxy_to: Callable[[str], Any],
) -> None:
    proxy, url = await proxy_to(database_url)
    chain = f"gw-full/{uuid7().hex[:8]}"
    async with SpoolSink(
        database_url=url,
        spool_dir=tmp_path / "s",
        chain_id=chain,
        max_bytes=16 * 1024,
        retry_max=0.1,
        connect_timeout=1.0,
    ) as sink:
        await sink.record(events(0))
        await proxy.cut()
        accepted = 1
        with pytest.raises(EventLogUnavailable) as refused:
            for i in range(1, 1000):
                await sink.record(events(i))
                accepted += 1
        assert refused.value.reason is Reason.EVENT_LOG_UNAVAILABLE
        assert sink.stats.full and 10 < accepted < 1000
        await proxy.restore()
        deadline = time.monotonic() + 5
        while sink.stats.queue_depth and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await sink.record(events(5000))  # accepted again once the spool drained
        accepted += 1
    assert len(await _stored(db, chain)) == accepted
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_a_closed_sink_refuses(database_url: str, tmp_path: Path) -> None:
    sink = SpoolSink(database_url=database_url, spool_dir=tmp_path / "s", chain_id="gw-closed")
    with pytest.raises(EventLogUnavailable):
        await sink.record(AuthEvent(instance="x", type="connect", outcome="allowed", reason="ok"))


async def test_a_blind_start_opens_a_new_chain_instead_of_guessing(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
    proxy_to: Callable[[str], Any],
) -> None:
    proxy, url = await proxy_to(database_url)
    await proxy.cut()  # an empty spool and no PostgreSQL: the chain head is unknown
    async with SpoolSink(
        database_url=url,
        spool_dir=tmp_path / "s",
        chain_id="gw-blind",
        retry_max=0.1,
        connect_timeout=1.0,
    ) as sink:
        assert sink.chain_id.startswith("gw-blind#")
        await sink.record(events(1))
        await proxy.restore()
    rows = await _stored(db, sink.chain_id)
    assert [r["seq"] for r in rows] == [1]
    # The spool now names that chain: the next start continues it.
    async with SpoolSink(database_url=url, spool_dir=tmp_path / "s", chain_id="gw-blind") as again:
        assert again.chain_id == sink.chain_id
        await again.record(events(2))
    assert [r["seq"] for r in await _stored(db, sink.chain_id)] == [1, 2]


async def test_a_spool_is_one_chain_and_one_process(database_url: str, tmp_path: Path) -> None:
    async with SpoolSink(database_url=database_url, spool_dir=tmp_path / "s", chain_id="gw-a"):
        with pytest.raises(EventLogUnavailable, match="in use"):
            await SpoolSink(
                database_url=database_url, spool_dir=tmp_path / "s", chain_id="gw-a"
            ).start()
    with pytest.raises(EventLogUnavailable, match="belongs to chain gw-a"):
        await SpoolSink(
            database_url=database_url, spool_dir=tmp_path / "s", chain_id="gw-b"
        ).start()
