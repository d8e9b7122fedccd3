"""``audit verify`` and ``audit prune`` on a scratch database: an untouched log verifies, and
each kind of tampering is reported at the exact row."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from gateway.events.sink import SpoolSink
from provisioning.audit.prune import prune
from provisioning.audit.verify import verify_chains
from provisioning.eventlog import append_event
from schemas.events import AuthEvent, EventType, Outcome, Reason

CHAIN = "gw-verify/w0"


async def _write(url: str, spool_dir: Path, events: list[AuthEvent]) -> None:
    async with SpoolSink(database_url=url, spool_dir=spool_dir, chain_id=CHAIN) as sink:
        for event in events:
            await sink.record(event)


async def _ids(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("SELECT seq, id FROM auth_events WHERE chain_id = $1", CHAIN)
    return {row["seq"]: str(row["id"]) for row in rows}


async def _provisioning_event(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await append_event(
            conn,
            instance="prov",
            type=EventType.ENROLL,
            outcome=Outcome.ALLOWED,
            reason=Reason.OK,
            device_id="dev-p",
        )


async def test_an_untouched_log_verifies_and_each_edit_is_found(
    scratch_url: str,
    scratch_db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
) -> None:
    await _write(scratch_url, tmp_path / "s", [events(i) for i in range(40)])
    await _provisioning_event(scratch_db)
    await _provisioning_event(scratch_db)
    report = await verify_chains(scratch_db)
    assert report.ok, report.findings
    assert (report.chains, report.events) == (2, 42)
    ids = await _ids(scratch_db)

    # An UPDATE of one event: that row, and only it.
    await scratch_db.execute(
        "UPDATE auth_events SET outcome = 'denied' WHERE chain_id = $1 AND seq = 7", CHAIN
    )
    findings = (await verify_chains(scratch_db)).findings
    assert [(f.kind, f.seq, f.event_id) for f in findings] == [("altered", 7, ids[7])]
    await scratch_db.execute(
        "UPDATE auth_events SET outcome = 'allowed' WHERE chain_id = $1 AND seq = 7", CHAIN
    )
    assert (await verify_chains(scratch_db)).ok

    # Two rows swap their seq values.
    await scratch_db.execute(
        "UPDATE auth_events SET seq = CASE seq WHEN 12 THEN 15 ELSE 12 END "
        "WHERE chain_id = $1 AND seq IN (12, 15)", CHAIN,
    )  # fmt: skip
    findings = (await verify_chains(scratch_db)).findings
    assert sorted((f.kind, f.seq, f.event_id, f.last_seq) for f in findings) == [
        ("reordered", 12, ids[15], 15),
        ("reordered", 15, ids[12], 12),
    ]
    await scratch_db.execute(
        "UPDATE auth_events SET seq = CASE seq WHEN 12 THEN 15 ELSE 12 END "
        "WHERE chain_id = $1 AND seq IN (12, 15)", CHAIN,
    )  # fmt: skip

    # A DELETE of one event: the gap, between its neighbours.
    await scratch_db.execute("DELETE FROM auth_events WHERE chain_id = $1 AND seq = 20", CHAIN)
    findings = (await verify_chains(scratch_db)).findings
    assert [(f.kind, f.seq, f.last_seq, f.previous_id, f.event_id) for f in findings] == [
        ("gap", 20, 20, ids[19], ids[21])
    ]

    # The provisioning chain's tail removed: its event_chains head gives it away.
    await scratch_db.execute("DELETE FROM auth_events WHERE chain_id = 'provisioning' AND seq = 2")
    kinds = {(f.chain_id, f.kind) for f in (await verify_chains(scratch_db)).findings}
    assert ("provisioning", "truncated") in kinds


async def test_a_recorded_prune_verifies_and_an_unrecorded_cut_does_not(
    scratch_url: str,
    scratch_db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
) -> None:
    old = datetime(2024, 1, 10, tzinfo=UTC)
    await scratch_db.execute(
        "CREATE TABLE auth_events_2024_01 PARTITION OF auth_events "
        "FOR VALUES FROM ('2024-01-01 00:00+00') TO ('2024-02-01 00:00+00')"
    )
    written = [events(i, time=old + timedelta(minutes=i)) for i in range(15)]
    written += [events(100 + i) for i in range(10)]
    await _write(scratch_url, tmp_path / "s", written)
    await _provisioning_event(scratch_db)
    assert (await verify_chains(scratch_db)).ok

    result = await prune(scratch_db, older_than=timedelta(days=180), instance="test")
    assert result.partitions == ["auth_events_2024_01"]
    assert result.events == 15
    assert result.points[CHAIN][0] == 16
    report = await verify_chains(scratch_db)
    assert report.ok, report.findings
    assert report.events == 10 + 2  # survivors, the provisioning event, the audit_prune event
    prune_event = await scratch_db.fetchrow(
        "SELECT reason, detail FROM auth_events WHERE type = 'audit_prune'"
    )
    assert prune_event["reason"] == "retention"
    assert await scratch_db.fetchval("SELECT events FROM audit_prunes") == 15

    # Without the recorded prune point the same start is a gap.
    await scratch_db.execute("DELETE FROM audit_prune_points WHERE chain_id = $1", CHAIN)
    findings = (await verify_chains(scratch_db)).findings
    assert [(f.kind, f.seq, f.last_seq) for f in findings] == [("gap", 1, 15)]
