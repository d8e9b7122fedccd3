"""The committer chains onto the head it committed last, and yields to other writers;
batches of new enrollments on one token run as one statement, all or nothing."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg

from provisioning import store
from provisioning.audit.verify import verify_chains
from provisioning.enrollment.committer import Committer
from provisioning.enrollment.service import Peer
from provisioning.errors import TokenRejected
from provisioning.eventlog import CHAIN_ID, ChainHead, EventSpec, append_event, append_events
from provisioning.http.server import open_service
from provisioning.pki.csr import parse_csr_pem
from schemas.events import EventType, Outcome, Reason
from schemas.settings import Settings
from tests.provisioning.conftest import make_token, new_fleet, some_csr, uses_left


def spec(fleet: str) -> EventSpec:
    return EventSpec(
        type=EventType.ADMIN, outcome=Outcome.ALLOWED, reason=Reason.OK, instance="t", fleet=fleet
    )


async def _head(db: asyncpg.Connection) -> tuple[int, str]:
    row = await db.fetchrow("SELECT seq, hash FROM event_chains WHERE chain_id = $1", CHAIN_ID)
    assert row is not None
    return row["seq"], row["hash"]


async def test_a_stale_expected_head_writes_nothing(db: asyncpg.Connection) -> None:
    fleet = f"ch-{secrets.token_hex(3)}"
    async with db.transaction():
        await append_event(
            db,
            instance="t",
            type=EventType.ADMIN,
            outcome=Outcome.ALLOWED,
            reason=Reason.OK,
            fleet=fleet,
        )
    seq, hash_ = await _head(db)
    stale = ChainHead(seq - 1, hash_, (await db.fetchval("SELECT now()")))
    async with db.transaction():
        events = await append_events(db, [spec(fleet)], expect=stale)
    # The stale guess was refused and the locked path chained onto the real head.
    assert [e.seq for e in events] == [seq + 1]
    assert events[0].prev_hash == hash_
    assert await _head(db) == (seq + 1, events[0].hash)
    rows = await db.fetch("SELECT seq FROM auth_events WHERE fleet = $1 ORDER BY seq", fleet)
    assert [r["seq"] for r in rows] == [seq, seq + 1]


async def test_batches_interleaved_with_another_writer_keep_one_chain(
    database_url: str, db: asyncpg.Connection
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    committer = Committer(pool)
    fleet = f"ch-{secrets.token_hex(3)}"

    async def write(conn: Any) -> tuple[None, EventSpec]:
        return None, spec(fleet)

    try:
        for _ in range(3):
            await asyncio.gather(*(committer.submit(write, savepoint=False) for _ in range(4)))
            # Another writer (an admin command, another replica) moves the head.
            async with db.transaction():
                await append_event(
                    db,
                    instance="other",
                    type=EventType.ADMIN,
                    outcome=Outcome.ALLOWED,
                    reason=Reason.OK,
                    fleet=fleet,
                )
        await asyncio.gather(*(committer.submit(write, savepoint=False) for _ in range(4)))
        before = await _head(db)
        await committer.submit(write, savepoint=False)  # chains onto its own last head
        after = await _head(db)
    finally:
        await committer.close()
        await pool.close()

    assert after[0] == before[0] + 1
    rows = await db.fetch(
        "SELECT seq, instance, time FROM auth_events WHERE fleet = $1 ORDER BY seq", fleet
    )
    assert len(rows) == 3 * 5 + 4 + 1
    assert sum(r["instance"] == "other" for r in rows) == 3
    times = [r["time"] for r in rows]
    assert times == sorted(times)
    report = await verify_chains(db, chain_id=CHAIN_ID)
    assert report.findings == []


async def _enroll_all(
    settings: Settings, token: str, count: int
) -> tuple[list[Any], dict[str, int]]:
    """``count`` concurrent in-process enrollments; the merged statement's outcomes."""
    service = await open_service(settings, pool_size=4)
    calls = {"applied": 0, "not_applied": 0}
    real = store.enroll_new_devices_chained

    async def counted(conn: Any, **kwargs: Any) -> Any:
        events = await real(conn, **kwargs)
        calls["applied" if events is not None else "not_applied"] += 1
        return events

    csr = parse_csr_pem(some_csr())
    store.enroll_new_devices_chained = counted  # type: ignore[assignment]
    try:
        # One first, so the committer knows the head; then the rest arrive together.
        results: list[Any] = [
            await service.enroll(
                token=token, csr=csr, hardware_id=None, peer=Peer(address="127.0.0.1")
            )
        ]
        results += await asyncio.gather(
            *(
                service.enroll(
                    token=token, csr=csr, hardware_id=None, peer=Peer(address="127.0.0.1")
                )
                for _ in range(count - 1)
            ),
            return_exceptions=True,
        )
    finally:
        store.enroll_new_devices_chained = real  # type: ignore[assignment]
        await service.close()
    return results, calls


async def test_merged_enrollments_are_all_or_nothing(
    settings: Settings, db: asyncpg.Connection
) -> None:
    fleet = new_fleet("merge")
    plenty, plenty_id = await make_token(db, fleet=fleet, uses=40)
    results, calls = await _enroll_all(settings, plenty, 24)
    assert all(not isinstance(r, BaseException) for r in results)
    assert calls["applied"] >= 1  # the batches after the first ran as one statement
    assert await uses_left(db, plenty_id) == 40 - 24

    # Fewer uses than a batch: the merged statement writes nothing, and item by item
    # exactly the uses left are spent.
    short, short_id = await make_token(db, fleet=fleet, uses=7)
    results, calls = await _enroll_all(settings, short, 20)
    issued = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TokenRejected)]
    assert len(issued) == 7 and len(refused) == 13
    assert {r.reason for r in refused} == {Reason.TOKEN_EXHAUSTED}
    assert calls["not_applied"] >= 1
    assert await uses_left(db, short_id) == 0

    devices = await db.fetch(
        "SELECT d.device_id, c.serial FROM devices d JOIN certificates c USING (device_id) "
        "WHERE d.fleet = $1",
        fleet,
    )
    assert len(devices) == 24 + 7
    allowed = await db.fetch(
        "SELECT device_id, cert_serial FROM auth_events WHERE fleet = $1 AND type = 'enroll' "
        "AND outcome = 'allowed'",
        fleet,
    )
    assert {(r["device_id"], r["cert_serial"]) for r in allowed} == {
        (r["device_id"], r["serial"]) for r in devices
    }
    report = await verify_chains(db, chain_id=CHAIN_ID)
    assert report.findings == []


async def test_a_merged_batch_after_another_writer_spends_no_extra_use(
    settings: Settings, db: asyncpg.Connection
) -> None:
    fleet = new_fleet("stale")
    token, token_id = await make_token(db, fleet=fleet, uses=50)
    service = await open_service(settings, pool_size=4)
    csr = parse_csr_pem(some_csr())
    peer = Peer(address="127.0.0.1")
    try:
        await service.enroll(token=token, csr=csr, hardware_id=None, peer=peer)
        # The head moves under the committer: its merged statement spends the token's uses,
        # then finds the head changed; the rollback must give those uses back.
        async with db.transaction():
            await append_event(
                db,
                instance="other",
                type=EventType.ADMIN,
                outcome=Outcome.ALLOWED,
                reason=Reason.OK,
                fleet=fleet,
            )
        await asyncio.gather(
            *(service.enroll(token=token, csr=csr, hardware_id=None, peer=peer) for _ in range(10))
        )
    finally:
        await service.close()
    assert await uses_left(db, token_id) == 50 - 11
    count = await db.fetchval("SELECT count(*) FROM devices WHERE fleet = $1", fleet)
    assert count == 11
    report = await verify_chains(db, chain_id=CHAIN_ID)
    assert report.findings == []
