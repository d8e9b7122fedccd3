"""SpoolSink at its limits, against the real PostgreSQL: the reserve that keeps refusals
recorded when the spool is full, the ``events_lost`` event that records what still could
not be kept, a real disk full (ENOSPC on a tiny tmpfs), and a shipping task that dies
while records wait for a flush."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.events.interface import EventLogUnavailable
from gateway.events.sink import SpoolSink
from provisioning.audit.verify import verify_chains
from schemas.events import AuthEvent, Outcome, Reason, uuid7
from tests.events.conftest import fill, tmpfs


async def _rows(conn: asyncpg.Connection, chain_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, seq, type, outcome, reason, detail FROM auth_events"
        " WHERE chain_id = $1 ORDER BY seq",
        chain_id,
    )
    return rows


async def _drained(sink: SpoolSink, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sink.stats.queue_depth and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not sink.stats.queue_depth, sink.stats


def _refusal(events: Callable[..., AuthEvent], index: int) -> AuthEvent:
    return events(index, outcome=Outcome.DENIED, reason=Reason.EVENT_LOG_UNAVAILABLE)


async def _record_until_refused(
    sink: SpoolSink, make: Callable[[int], AuthEvent], start: int, limit: int = 1000
) -> list[AuthEvent]:
    """Record ``make(start)``, ``make(start + 1)``... until one is refused; the accepted."""
    accepted: list[AuthEvent] = []
    for index in range(start, start + limit):
        event = make(index)
        try:
            await sink.record(event)
        except EventLogUnavailable as exc:
            assert exc.reason is Reason.EVENT_LOG_UNAVAILABLE
            return accepted
        accepted.append(event)
    raise AssertionError(f"{limit} events and never refused")


def _lost(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [json.loads(r["detail"]) for r in rows if r["type"] == "events_lost"]


async def test_refusals_use_the_reserve_and_a_loss_is_itself_recorded(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
    proxy_to: Callable[[str], Any],
) -> None:
    proxy, url = await proxy_to(database_url)
    chain = f"gw-reserve/{uuid7().hex[:8]}"
    async with SpoolSink(
        database_url=url,
        spool_dir=tmp_path / "s",
        chain_id=chain,
        max_bytes=32 * 1024,  # 4 KiB segments; admissions stop at 28 KiB
        retry_max=0.1,
        connect_timeout=1.0,
    ) as sink:
        await proxy.cut()
        admitted = await _record_until_refused(sink, events, 0)
        assert sink.stats.full and 20 < len(admitted) < 60
        # Past the soft limit the refusals still go in, up to max_bytes...
        refusals = await _record_until_refused(sink, lambda i: _refusal(events, i), 1000)
        assert len(refusals) >= 4, len(refusals)
        assert sink.stats.spool_bytes <= 32 * 1024
        # ...and beyond it they are counted.
        for index in range(2000, 2005):
            with pytest.raises(EventLogUnavailable):
                await sink.record(_refusal(events, index))
        assert sink.stats.events_lost == 6  # the one that ended the loop, and these five
        assert sink.stats.events_lost_total == 6

        await proxy.restore()
        await _drained(sink)
        last = events(5000)
        await sink.record(last)  # admitted again once shipping made room
        assert sink.stats.events_lost == 0
        assert sink.stats.events_lost_total == 6  # a running total: recording it clears nothing
    rows = await _rows(db, chain)
    stored = [str(r["id"]) for r in rows if r["type"] != "events_lost"]
    assert stored == [str(e.id) for e in [*admitted, *refusals, last]]
    (lost,) = _lost(rows)
    assert lost["count"] == 6 and lost["first"] <= lost["last"]
    assert lost["lost"] == [
        {"type": "connect", "outcome": "denied", "reason": "event_log_unavailable", "count": 6}
    ]
    (summary,) = [r for r in rows if r["type"] == "events_lost"]
    assert (summary["outcome"], summary["reason"]) == ("denied", "event_log_unavailable")
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_a_full_disk_refuses_admissions_keeps_refusals_and_recovers(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    chain = f"gw-enospc/{uuid7().hex[:8]}"
    with tmpfs(tmp_path / "fs", 128 * 1024) as fs:
        sink = SpoolSink(
            database_url=database_url,
            spool_dir=fs / "s",
            chain_id=chain,
            max_bytes=1024 * 1024,  # never reached: the disk is full first
            # The spare is attempted (and fails) once the active segment is half full: 16 KiB
            # leaves ~10 records of room for that thread's verdict; 4 KiB left ~2, a race.
            segment_bytes=16 * 1024,
        )
        async with sink:
            first = events(0)
            await sink.record(first)
            filler = fill(fs)
            # The spare segment cannot be made: admissions stop while the active segment
            # still has room, and that room takes the refusals.
            admitted = [first, *await _record_until_refused(sink, events, 1)]
            refusals = await _record_until_refused(sink, lambda i: _refusal(events, i), 1000)
            assert refusals, "the active segment kept no room for refusals"
            lost = 1  # the refusal that ended the loop: its group found no room
            for index in range(2000, 2004):
                with pytest.raises(EventLogUnavailable, match="disk"):
                    await sink.record(_refusal(events, index))
                lost += 1
            with pytest.raises(EventLogUnavailable, match="disk is full"):
                await sink.record(events(3000))  # an admission: refused, not counted
            assert sink.stats.events_lost == lost and sink.stats.full
            assert sink.stats.events_lost_total == lost  # the admission is not a loss

            filler.unlink()
            later = _refusal(events, 4000)
            await sink.record(later)  # the events_lost event goes first, then this
            assert not sink.stats.full
            readmitted = [events(5000 + i) for i in range(5)]
            for event in readmitted:
                await sink.record(event)
            stored = len(admitted) + len(refusals) + 1 + len(readmitted)
            assert sink.stats.events_recorded == stored + 1  # and the events_lost event
        assert sink.stats.events_lost == 0
        # A restart on the same spool continues the chain.
        async with SpoolSink(
            database_url=database_url, spool_dir=fs / "s", chain_id=chain, segment_bytes=16 * 1024
        ) as again:
            final = events(9000)
            await again.record(final)

    rows = await _rows(db, chain)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    stored = [str(r["id"]) for r in rows if r["type"] != "events_lost"]
    expected = [*admitted, *refusals, later, *readmitted, final]
    assert stored == [str(e.id) for e in expected]
    (summary,) = _lost(rows)
    assert summary["count"] == lost
    assert summary["lost"] == [
        {"type": "connect", "outcome": "denied", "reason": "event_log_unavailable", "count": lost}
    ]
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_concurrent_records_on_a_full_disk_keep_the_chain_whole(
    database_url: str, db: asyncpg.Connection, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    """Groups queued behind one that fails for lack of space are chained on it: they are
    refused too (counted as lost), and the chain goes on from the last durable record."""
    chain = f"gw-enospc-burst/{uuid7().hex[:8]}"
    with tmpfs(tmp_path / "fs", 128 * 1024) as fs:
        async with SpoolSink(
            database_url=database_url, spool_dir=fs / "s", chain_id=chain, segment_bytes=16 * 1024
        ) as sink:
            await sink.record(events(0))
            filler = fill(fs)
            burst = [_refusal(events, i) for i in range(1, 401)]
            results: dict[int, BaseException | None] = {}

            async def one(index: int) -> None:
                try:
                    results[index] = await sink.record(burst[index])
                except EventLogUnavailable as exc:
                    results[index] = exc

            tasks = []
            for index in range(len(burst)):  # spread out, so groups queue behind groups
                tasks.append(asyncio.create_task(one(index)))
                await asyncio.sleep(0.0002)
            await asyncio.gather(*tasks)
            kept = [burst[i] for i in sorted(results) if results[i] is None]
            refused = [r for r in results.values() if r is not None]
            assert kept and refused, "the burst should overflow the active segment"
            assert sink.stats.events_lost_total == len(refused)
            filler.unlink()
            later = _refusal(events, 1000)
            await sink.record(later)  # after the events_lost event
            await _drained(sink)
    rows = await _rows(db, chain)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    stored = [str(r["id"]) for r in rows if r["type"] != "events_lost"]
    assert sorted(stored[1:-1]) == sorted(str(e.id) for e in kept)
    assert stored[-1] == str(later.id)
    assert sum(summary["count"] for summary in _lost(rows)) == len(refused)
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_a_restart_on_a_full_disk_replays_the_spool_and_refuses_only_admissions(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
    proxy_to: Callable[[str], Any],
) -> None:
    proxy, url = await proxy_to(database_url)
    chain = f"gw-fullstart/{uuid7().hex[:8]}"
    options: dict[str, Any] = {
        "database_url": url,
        "chain_id": chain,
        "segment_bytes": 4096,
        "retry_max": 0.1,
        "connect_timeout": 1.0,
        "drain_timeout": 0.2,
    }
    with tmpfs(tmp_path / "fs", 128 * 1024) as fs:
        kept = [events(i) for i in range(3)]
        async with SpoolSink(spool_dir=fs / "s", **options) as sink:
            await proxy.cut()
            for event in kept:
                await sink.record(event)
        await proxy.restore()  # left unshipped in the spool; then the disk fills
        filler = fill(fs)
        async with SpoolSink(spool_dir=fs / "s", **options) as again:  # needs no new file
            with pytest.raises(EventLogUnavailable, match="disk is full"):
                await again.record(events(100))
            denials = [_refusal(events, 101)]
            await again.record(denials[0])
            filler.unlink()
            for index in range(102, 122):  # each flush may retry the spare segment
                if not again.stats.full:
                    break
                denials.append(_refusal(events, index))
                await again.record(denials[-1])
                await asyncio.sleep(0.1)
            admitted = events(200)
            await again.record(admitted)
            await _drained(again)
    rows = await _rows(db, chain)
    assert [str(r["id"]) for r in rows] == [str(e.id) for e in [*kept, *denials, admitted]]
    assert (await verify_chains(db, chain_id=chain)).ok


async def test_a_dead_shipping_task_wakes_every_waiting_record(
    database_url: str, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    sink = SpoolSink(
        database_url=database_url,
        spool_dir=tmp_path / "s",
        chain_id=f"gw-dead/{uuid7().hex[:8]}",
        flush_interval=3.0,  # the second group waits for a flush 3 s after the first
        ship_interval=0.0,
        drain_timeout=0.2,
    )
    await sink.start()
    try:
        gate = asyncio.Event()

        async def broken(*args: object) -> None:  # a bug in shipping, injected
            await gate.wait()
            raise RuntimeError("shipping bug")

        sink._ship = broken  # type: ignore[method-assign]
        await sink.record(events(0))  # flushed at once; shipping it will kill the task
        waiting = asyncio.ensure_future(sink.record(events(1)))
        for _ in range(200):  # until it waits for the next flush, due 3 s from now
            if sink._open is not None:
                break
            await asyncio.sleep(0.01)
        assert sink._open is not None and not waiting.done()
        started = time.monotonic()
        gate.set()
        # asyncio.wait, not wait_for: a record waiting for a flush cannot be cancelled.
        done, _ = await asyncio.wait({waiting}, timeout=5)
        if not done:
            stuck = sink._open  # wake it ourselves, or the test itself never ends
            if stuck is not None and not stuck.future.done():
                stuck.future.set_exception(RuntimeError("woken by the test"))
            pytest.fail("record() still waits for a flush that nobody will run")
        with pytest.raises(EventLogUnavailable, match="shipping bug"):
            waiting.result()
        assert time.monotonic() - started < 1.5  # woken by the death, not the flush timer
        with pytest.raises(EventLogUnavailable):
            await sink.record(events(2))
    finally:
        await asyncio.wait_for(sink.close(), 10)  # before the fix, close() hung as well
