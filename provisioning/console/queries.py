"""The console's own SQL: overview aggregates, chain heads, expiring certificates.

Event listings go through `provisioning.audit.query`; this module has what it lacks. Each
query is shaped for an index of ``auth_events`` (docs/console.md has the plans):

- live activity: ``time`` range on ``(time DESC, id DESC)`` grouped by reason, buckets by
  ``date_bin``; a day or week view reads only the hours after the rollup's last filled one
  this way (`rollup`);
- chain heads: a skip scan (recursive CTE) over ``(chain_id, seq)``: one index probe per
  chain instead of a pass over the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from provisioning.audit.counting import DECISIONS

Connection = Any  # asyncpg.Connection

CONNECTION_TYPES = ("tls_handshake", "connect")
"""Event types of an admission decision (a refused handshake, or a CONNECT)."""

ORIGIN = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
"""Buckets are aligned on this instant, so the same bucket has the same bounds on reload."""


@dataclass(frozen=True, slots=True)
class ActivityRow:
    bucket: datetime
    connection: bool
    outcome: str
    reason: str
    count: int


ACTIVITY_WORK_MEM = "64MB"
"""For the aggregates: the grouping sets hash in memory; at the default 4 MB they may sort on
disk."""

# Decisions by (bucket, admission, outcome, reason) of the events in [$1, $2): the newest hour
# of a day or week view (older hours come from the rollup, `rollup`), or the whole last hour.
_ACTIVITY = f"""
SELECT date_bin($3::interval, time, $4::timestamptz) AS bucket,
       type = ANY($5::text[]) AS connection, outcome, reason, sum({DECISIONS})::bigint AS n
FROM auth_events WHERE time >= $1 AND time < $2
GROUP BY 1, 2, 3, 4
"""  # noqa: S608 (constant SQL from provisioning.audit.counting)


async def live_activity(
    conn: Connection, *, start: datetime, end: datetime, stride: timedelta
) -> list[ActivityRow]:
    """Counts per bucket of ``[start, end)`` by admission, outcome and reason, from the
    events themselves (the caller sets the transaction and ``work_mem``)."""
    if start >= end:
        return []
    rows = await conn.fetch(_ACTIVITY, start, end, stride, ORIGIN, list(CONNECTION_TYPES))
    return [
        ActivityRow(r["bucket"], r["connection"], r["outcome"], r["reason"], r["n"]) for r in rows
    ]


@dataclass(frozen=True, slots=True)
class ExpiringCertificate:
    serial: str
    device_id: str
    fleet: str
    not_after: datetime


async def expiring_certificates(
    conn: Connection, *, within: timedelta, limit: int = 50
) -> tuple[int, list[ExpiringCertificate]]:
    """Active certificates whose validity ends in the next ``within``: (count, first ones)."""
    rows = await conn.fetch(
        """SELECT c.serial, c.device_id, d.fleet, c.not_after, count(*) OVER () AS total
           FROM certificates c JOIN devices d USING (device_id)
           WHERE c.status = 'active' AND c.not_after >= now() AND c.not_after < now() + $1
           ORDER BY c.not_after, c.serial LIMIT $2""",
        within, limit,
    )  # fmt: skip
    total = rows[0]["total"] if rows else 0
    return total, [
        ExpiringCertificate(r["serial"], r["device_id"], r["fleet"], r["not_after"]) for r in rows
    ]


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last stored event of one chain."""

    chain_id: str
    seq: int
    time: datetime
    instance: str


_CHAIN_HEADS = """
WITH RECURSIVE chains AS (
    (SELECT chain_id FROM auth_events ORDER BY chain_id LIMIT 1)
    UNION ALL
    SELECT (SELECT e.chain_id FROM auth_events e WHERE e.chain_id > c.chain_id
            ORDER BY e.chain_id LIMIT 1)
    FROM chains c WHERE c.chain_id IS NOT NULL
)
SELECT c.chain_id, last.seq, last.time, last.instance
FROM chains c
CROSS JOIN LATERAL (
    SELECT e.seq, e.time, e.instance FROM auth_events e
    WHERE e.chain_id = c.chain_id ORDER BY e.seq DESC LIMIT 1
) last
WHERE c.chain_id IS NOT NULL
ORDER BY c.chain_id
"""


async def chain_heads(conn: Connection) -> list[ChainHead]:
    """Every chain with its last event (by seq)."""
    rows = await conn.fetch(_CHAIN_HEADS)
    return [ChainHead(r["chain_id"], r["seq"], r["time"], r["instance"]) for r in rows]


@dataclass(frozen=True, slots=True)
class InstanceSeen:
    """A writer instance (gateway or provisioning) and the newest event of its chains."""

    instance: str
    last_seen: datetime
    chains: tuple[str, ...]


def instances(heads: list[ChainHead]) -> list[InstanceSeen]:
    """Chain heads grouped by instance, most recently seen first."""
    grouped: dict[str, list[ChainHead]] = {}
    for head in heads:
        grouped.setdefault(head.instance, []).append(head)
    seen = [
        InstanceSeen(name, max(h.time for h in group), tuple(h.chain_id for h in group))
        for name, group in grouped.items()
    ]
    return sorted(seen, key=lambda item: item.last_seen, reverse=True)


async def database_now(conn: Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT now()")
    return now
