"""Retention of the auth event log: drop whole monthly partitions older than a cutoff.

Invariants:

- Only partitions named ``auth_events_YYYY_MM`` (made by ``devicegate_ensure_partitions``)
  whose whole month ends at or before the cutoff are dropped; the default partition never is.
- Everything happens in one transaction, under an advisory lock: the partitions are dropped,
  the prune is recorded in ``audit_prunes`` with, for every chain that lost events, the seq
  the chain now starts at and the prev_hash that seq carries (``audit_prune_points``), and an
  ``audit_prune`` event (reason ``retention``) is appended to the provisioning chain. Either
  all of it happens or none: the verifier never sees an unexplained cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from provisioning.eventlog import append_event
from schemas.events import EventType, Outcome, Reason, utcnow

Connection = Any  # asyncpg.Connection

_LOCK_KEY = 0x6465_7667_7072_756E  # "devgprun"
_PARTITION = re.compile(r"^auth_events_(\d{4})_(\d{2})$")


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """The partitions a prune would drop, and how many events they hold."""

    cutoff: datetime
    partitions: list[str]
    events: int


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune dropped and recorded.

    Attributes:
        points: per chain, (first surviving seq, its prev_hash).
    """

    cutoff: datetime
    partitions: list[str]
    events: int
    prune_id: int | None = None
    event_id: str | None = None
    points: dict[str, tuple[int, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "partitions": self.partitions,
            "events": self.events,
            "prune_id": self.prune_id,
            "event_id": self.event_id,
            "points": {chain: list(point) for chain, point in self.points.items()},
        }


def _month_end(year: int, month: int) -> datetime:
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


async def _old_partitions(conn: Connection, cutoff: datetime) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'auth_events'::regclass ORDER BY c.relname"
    )
    names = []
    for row in rows:
        match = _PARTITION.match(row["relname"])
        if match and _month_end(int(match[1]), int(match[2])) <= cutoff:
            names.append(row["relname"])
    return names


# Rows of the dropped partitions: every monthly partition ending at or before the boundary
# is dropped, so they are exactly the rows before it outside the default partition.
_COUNT_DROPPED = (
    "SELECT count(*) FROM auth_events "
    "WHERE time < $1 AND tableoid <> 'auth_events_default'::regclass"
)
_LAST_DROPPED = (
    "SELECT DISTINCT ON (chain_id) chain_id, seq, hash FROM auth_events "
    "WHERE time < $1 AND tableoid <> 'auth_events_default'::regclass "
    "ORDER BY chain_id, seq DESC"
)


def _boundary(partitions: list[str]) -> datetime:
    ends = []
    for name in partitions:
        match = _PARTITION.match(name)
        assert match is not None
        ends.append(_month_end(int(match[1]), int(match[2])))
    return max(ends)


async def plan_prune(
    conn: Connection, *, older_than: timedelta, now: datetime | None = None
) -> PrunePlan:
    """What `prune` would drop, without changing anything."""
    cutoff = (now or utcnow()) - older_than
    partitions = await _old_partitions(conn, cutoff)
    events = 0
    if partitions:
        events = await conn.fetchval(_COUNT_DROPPED, _boundary(partitions))
    return PrunePlan(cutoff, partitions, events)


async def prune(
    conn: Connection,
    *,
    older_than: timedelta,
    instance: str,
    now: datetime | None = None,
) -> PruneResult:
    """Drop the partitions entirely older than ``now - older_than`` and record the prune.

    Args:
        conn: an asyncpg connection (not inside a transaction).
        older_than: retention; whole months ending before ``now - older_than`` go.
        instance: who prunes, for the ``audit_prune`` event.
        now: the current time (tests).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        plan = await plan_prune(conn, older_than=older_than, now=now)
        if not plan.partitions:
            return PruneResult(plan.cutoff, [], 0)
        lasts = await conn.fetch(_LAST_DROPPED, _boundary(plan.partitions))
        points = {row["chain_id"]: (row["seq"] + 1, row["hash"]) for row in lasts}
        for name in plan.partitions:
            await conn.execute(f'DROP TABLE "{name}"')  # a name that matched _PARTITION
        prune_id = await conn.fetchval(
            "INSERT INTO audit_prunes (pruned_before, partitions, events) "
            "VALUES ($1, $2, $3) RETURNING id",
            plan.cutoff, plan.partitions, plan.events,
        )  # fmt: skip
        await conn.executemany(
            "INSERT INTO audit_prune_points (prune_id, chain_id, first_seq, prev_hash) "
            "VALUES ($1, $2, $3, $4)",
            [(prune_id, chain, seq, prev) for chain, (seq, prev) in points.items()],
        )
        event = await append_event(
            conn,
            instance=instance,
            type=EventType.AUDIT_PRUNE,
            outcome=Outcome.ALLOWED,
            reason=Reason.RETENTION,
            detail={
                "prune_id": prune_id,
                "cutoff": plan.cutoff.isoformat(),
                "partitions": plan.partitions,
                "events": plan.events,
                "points": {chain: [seq, prev] for chain, (seq, prev) in points.items()},
            },
        )
    return PruneResult(plan.cutoff, plan.partitions, plan.events, prune_id, str(event.id), points)
