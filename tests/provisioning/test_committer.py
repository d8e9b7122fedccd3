"""Group commit: items share a transaction but fail alone, and callers hear only after COMMIT."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import pytest

from provisioning.enrollment.committer import Committer
from provisioning.errors import Conflict
from provisioning.eventlog import EventSpec
from schemas.events import EventType, Outcome, Reason


def spec(fleet: str) -> EventSpec:
    return EventSpec(
        type=EventType.ADMIN, outcome=Outcome.ALLOWED, reason=Reason.OK, instance="t", fleet=fleet
    )


async def test_a_refused_item_rolls_back_alone(database_url: str, db: asyncpg.Connection) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    committer = Committer(pool)
    names = [f"gc-{secrets.token_hex(3)}-{i}" for i in range(6)]

    def work(name: str, refuse: bool) -> Any:
        async def write(conn: Any) -> tuple[str, EventSpec]:
            await conn.execute("INSERT INTO fleets (name) VALUES ($1)", name)
            if refuse:
                raise Conflict(f"{name} refused after writing")
            return name, spec(name)

        return write

    try:
        results = await asyncio.gather(
            *(committer.submit(work(name, i % 3 == 1)) for i, name in enumerate(names)),
            return_exceptions=True,
        )
    finally:
        await committer.close()
        await pool.close()

    refused = {names[i] for i in range(6) if i % 3 == 1}
    for name, result in zip(names, results, strict=True):
        if name in refused:
            assert isinstance(result, Conflict)
        else:
            assert result == name
    stored = {
        row["name"] for row in await db.fetch("SELECT name FROM fleets WHERE name = ANY($1)", names)
    }
    assert stored == set(names) - refused
    events = await db.fetch(
        "SELECT fleet, seq FROM auth_events WHERE fleet = ANY($1) ORDER BY seq", names
    )
    assert {e["fleet"] for e in events} == set(names) - refused
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_a_failed_commit_fails_every_item(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    committer = Committer(pool)

    async def write(conn: Any) -> tuple[None, EventSpec]:
        # Deferred until COMMIT: the whole transaction fails there.
        await conn.execute(
            "CREATE TEMP TABLE gc_deferred (x int UNIQUE DEFERRABLE INITIALLY DEFERRED) "
            "ON COMMIT DROP"
        )
        await conn.execute("INSERT INTO gc_deferred VALUES (1), (1)")
        return None, None

    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await committer.submit(write)
    finally:
        await committer.close()
        await pool.close()
