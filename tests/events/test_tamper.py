"""The audit log against its database administrator (issue 20, parts 3 and 4), on a real
PostgreSQL with checkpoints signed by the audit key `init_pki` issues.

An attacker here has full write access to the database: deletes rows, moves the chain
heads back to match, edits or deletes checkpoint rows. What they cannot do is sign.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.events.checkpoints import CheckpointPolicy
from gateway.events.sink import SpoolSink
from provisioning.audit.checkpoints import read_directory, trust_store
from provisioning.audit.verify import VerifyReport, verify_chains
from provisioning.eventlog import CHAIN_ID, append_event
from schemas.checkpoints import AuditSigner, checkpoint_file, write_checkpoint
from schemas.events import AuthEvent, EventType, Outcome, Reason, uuid7
from tests.conftest import Pki

NAME = "gw-tamper/w0"


def _policy(pki: Pki, directory: Path) -> CheckpointPolicy:
    return CheckpointPolicy(
        signer=AuditSigner.load(pki.directory), file=checkpoint_file(directory, NAME),
        interval=3600.0,  # only the shutdown checkpoint: the test decides when
    )  # fmt: skip


async def _gateway(url: str, spool: Path, pki: Pki, cps: Path, events: list[AuthEvent]) -> str:
    async with SpoolSink(
        database_url=url, spool_dir=spool, chain_id=NAME, random_id=True,
        checkpoints=_policy(pki, cps),
    ) as sink:  # fmt: skip
        for event in events:
            await sink.record(event)
        return sink.chain_id


async def _verify(conn: asyncpg.Connection, pki: Pki, cps: Path | None = None) -> VerifyReport:
    external = read_directory(cps)[0] if cps is not None else None
    return await verify_chains(conn, trust=trust_store(pki.directory), external=external)


async def _truncate(conn: asyncpg.Connection, chain: str, count: int) -> None:
    """Delete the newest ``count`` events of ``chain`` and move its head back to match:
    what a careful administrator would do. Kept in ``saved`` to put back."""
    await conn.execute("CREATE TABLE IF NOT EXISTS saved AS SELECT * FROM auth_events WITH NO DATA")
    await conn.execute(
        "WITH gone AS (DELETE FROM auth_events WHERE chain_id = $1 AND seq > "
        "(SELECT max(seq) FROM auth_events WHERE chain_id = $1) - $2 RETURNING *) "
        "INSERT INTO saved SELECT * FROM gone",
        chain, count,
    )  # fmt: skip
    await conn.execute(
        "UPDATE event_chains SET (seq, hash) = (SELECT seq, hash FROM auth_events "
        "WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1) WHERE chain_id = $1",
        chain,
    )


async def _restore(conn: asyncpg.Connection, chain: str) -> None:
    await conn.execute("INSERT INTO auth_events SELECT * FROM saved")
    await conn.execute("DELETE FROM saved")
    await conn.execute(
        "UPDATE event_chains SET (seq, hash) = (SELECT seq, hash FROM auth_events "
        "WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1) WHERE chain_id = $1",
        chain,
    )


async def _provisioning_events(conn: asyncpg.Connection, count: int) -> None:
    for i in range(count):
        async with conn.transaction():
            await append_event(
                conn, instance="prov", type=EventType.ENROLL, outcome=Outcome.ALLOWED,
                reason=Reason.OK, device_id=f"dev-{i}",
            )  # fmt: skip


def _truncations(report: VerifyReport) -> list[tuple[str, int, int | None]]:
    return [(f.chain_id, f.seq, f.last_seq) for f in report.findings if f.kind == "truncated"]


@pytest.mark.parametrize("count", [1, 3, 100])
async def test_deleting_the_newest_events_is_found_on_either_chain(
    count: int,
    scratch_url: str,
    scratch_db: asyncpg.Connection,
    tmp_path: Path,
    pki: Pki,
    events: Callable[..., AuthEvent],
) -> None:
    cps = tmp_path / "checkpoints"
    chain = await _gateway(scratch_url, tmp_path / "s", pki, cps, [events(i) for i in range(150)])
    await _provisioning_events(scratch_db, 120)
    signer = AuditSigner.load(pki.directory)
    assert await write_checkpoint(
        scratch_db, signer, chain_id=CHAIN_ID, head=None, file=checkpoint_file(cps, "prov")
    )
    report = await _verify(scratch_db, pki)
    assert report.ok, report.findings
    assert report.checkpoints == 2

    for victim, last in ((chain, 150), (CHAIN_ID, 120)):
        await _truncate(scratch_db, victim, count)
        report = await _verify(scratch_db, pki)
        assert not report.ok
        assert _truncations(report) == [(victim, last - count + 1, last)], report.findings
        await _restore(scratch_db, victim)
        assert (await _verify(scratch_db, pki)).ok

    # The gateway restarts on an empty spool: a new chain; the old one's truncation stays
    # visible (nothing continues from the truncated head).
    await _truncate(scratch_db, chain, count)
    shutil.rmtree(tmp_path / "s")
    new_chain = await _gateway(scratch_url, tmp_path / "s", pki, cps, [events(1000)])
    assert new_chain != chain
    report = await _verify(scratch_db, pki)
    assert _truncations(report) == [(chain, 150 - count + 1, 150)], report.findings


async def test_checkpoint_rows_deleted_or_edited_are_found(
    scratch_url: str,
    scratch_db: asyncpg.Connection,
    tmp_path: Path,
    pki: Pki,
    events: Callable[..., AuthEvent],
) -> None:
    cps = tmp_path / "checkpoints"
    spool = tmp_path / "s"
    for round_ in range(3):  # three runs: three checkpoints of one chain
        chain = await _gateway(
            scratch_url, spool, pki, cps, [events(round_ * 10 + i) for i in range(10)]
        )
    assert (await _verify(scratch_db, pki)).ok
    assert await scratch_db.fetchval("SELECT count(*) FROM audit_checkpoints") == 3

    # An edit of a signed column, then undone.
    await scratch_db.execute(
        "UPDATE audit_checkpoints SET seq = 5 WHERE chain_id = $1 AND n = 2", chain
    )
    report = await _verify(scratch_db, pki)
    assert [f.kind for f in report.findings] == ["checkpoint"], report.findings
    await scratch_db.execute(
        "UPDATE audit_checkpoints SET seq = 20 WHERE chain_id = $1 AND n = 2", chain
    )
    assert (await _verify(scratch_db, pki)).ok

    # A checkpoint in the middle, then the newest one.
    saved = await scratch_db.fetch("SELECT * FROM audit_checkpoints WHERE chain_id = $1", chain)
    for n in (2, 3):
        await scratch_db.execute(
            "DELETE FROM audit_checkpoints WHERE chain_id = $1 AND n = $2", chain, n
        )
        report = await _verify(scratch_db, pki)
        assert not report.ok
        assert {f.kind for f in report.findings} == {"checkpoint"}, report.findings
        row = next(r for r in saved if r["n"] == n)
        await scratch_db.execute(
            "INSERT INTO audit_checkpoints VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            *row.values(),
        )
    assert (await _verify(scratch_db, pki)).ok

    # A forged checkpoint: signed by a key that is not the audit signer.
    await scratch_db.execute(
        "UPDATE audit_checkpoints SET signature = $2 WHERE chain_id = $1 AND n = 3",
        chain, "AAAA" + saved[0]["signature"][4:],
    )  # fmt: skip
    assert [f.kind for f in (await _verify(scratch_db, pki)).findings] == ["checkpoint"]


async def test_deleting_events_and_their_checkpoints_is_found_with_the_external_copies(
    scratch_url: str,
    scratch_db: asyncpg.Connection,
    tmp_path: Path,
    pki: Pki,
    events: Callable[..., AuthEvent],
) -> None:
    cps = tmp_path / "checkpoints"
    spool = tmp_path / "s"
    chain = await _gateway(scratch_url, spool, pki, cps, [events(i) for i in range(20)])
    await _gateway(scratch_url, spool, pki, cps, [events(100 + i) for i in range(20)])
    # The thorough attacker: the last 20 events, the checkpoint that names them, and every
    # counter that would tell.
    await _truncate(scratch_db, chain, 20)
    await scratch_db.execute("DELETE FROM audit_checkpoints WHERE chain_id = $1 AND n = 2", chain)
    await scratch_db.execute(
        "UPDATE audit_chains SET (checkpoint_n, checkpoint_hash) = (1, (SELECT digest FROM "
        "audit_checkpoints WHERE chain_id = $1 AND n = 1)) WHERE chain_id = $1",
        chain,
    )
    assert (await _verify(scratch_db, pki)).ok  # the database alone can no longer tell
    report = await _verify(scratch_db, pki, cps)
    assert {f.kind for f in report.findings} == {"checkpoint", "truncated"}, report.findings
    assert any("external copies but not in the database" in f.message for f in report.findings)
    assert _truncations(report) == [(chain, 21, 40)]


async def test_a_spool_with_history_meets_a_fresh_database(
    scratch_url: str, tmp_path: Path, pki: Pki, events: Callable[..., AuthEvent]
) -> None:
    from tests.conftest import _create_database, _drop_database

    cps = tmp_path / "checkpoints"
    spool = tmp_path / "s"
    old = await _gateway(scratch_url, spool, pki, cps, [events(i) for i in range(30)])
    fresh_name = f"dg_test_ev_fresh_{uuid7().hex[:8]}"
    fresh = await _create_database(fresh_name, migrated=True)
    try:
        new = await _gateway(fresh, spool, pki, cps, [events(100 + i) for i in range(5)])
        assert new != old and new.startswith(f"{NAME}#")
        conn = await asyncpg.connect(fresh)
        try:
            report = await _verify(conn, pki)
            genesis = await conn.fetchrow("SELECT * FROM audit_chains WHERE chain_id = $1", new)
        finally:
            await conn.close()
        assert report.ok, report.findings
        assert (genesis["previous_chain"], genesis["previous_seq"]) == (old, 30)
        assert [n.kind for n in report.notices] == ["boundary"]
        assert old in report.notices[0].message
    finally:
        await _drop_database(fresh_name)


async def test_two_gateways_on_one_host_write_two_chains_and_a_copied_spool_is_refused(
    scratch_url: str,
    scratch_db: asyncpg.Connection,
    tmp_path: Path,
    pki: Pki,
    events: Callable[..., AuthEvent],
) -> None:
    cps = tmp_path / "checkpoints"
    first = SpoolSink(
        database_url=scratch_url, spool_dir=tmp_path / "a", chain_id=NAME, random_id=True
    )
    second = SpoolSink(
        database_url=scratch_url, spool_dir=tmp_path / "b", chain_id=NAME, random_id=True
    )
    async with first, second:
        assert first.chain_id != second.chain_id
        for i in range(10):
            await first.record(events(i))
            await second.record(events(i))
        # A copy of the first spool (a cloned disk) in a third process: refused, naming it.
        await first.drained()
        shutil.copytree(tmp_path / "a", tmp_path / "copy", ignore=shutil.ignore_patterns("lock"))
        third = SpoolSink(database_url=scratch_url, spool_dir=tmp_path / "copy", chain_id=NAME)
        with pytest.raises(Exception, match=r"already being written by gw-tamper .*spool .*/a"):
            await third.start()
    report = await _verify(scratch_db, pki, cps if cps.exists() else None)
    assert report.ok and report.chains == 2, report.findings


def test_the_verifier_hashes_rows_as_the_writers_hash_events(
    events: Callable[..., AuthEvent],
) -> None:
    from datetime import timedelta, timezone

    from provisioning.audit.verify import row_hash
    from schemas.events import GENESIS_HASH, chain_hash

    for i, detail in enumerate(({}, {"b": [1, "ü"], "a": None}, {"x": {"z": 1, "y": 2.5}})):
        event = events(i, detail=detail).chained(chain_id="c#1", seq=i + 1, prev_hash=GENESIS_HASH)
        row = event.model_dump()
        row["time"] = event.time.astimezone(timezone(timedelta(hours=-5)))  # any zone
        row["type"], row["outcome"], row["reason"] = (
            event.type.value,
            event.outcome.value,
            event.reason.value,
        )
        assert row_hash(GENESIS_HASH, row) == chain_hash(GENESIS_HASH, event) == event.hash
        row["detail"] = __import__("json").dumps(detail)  # as asyncpg returns jsonb
        assert row_hash(GENESIS_HASH, row) == event.hash
