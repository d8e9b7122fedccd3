"""The console's own SQL: overview aggregates, chain heads, expiring certificates.

Event listings go through `provisioning.event_query`; this module has what it lacks. Each
query is shaped for an index of ``auth_events`` (docs/console.md has the plans):

- activity: ``time`` range on ``(time DESC, id DESC)`` grouped by reason, then the denials
  alone on ``(outcome, time DESC)`` with two grouping sets (devices, peer hosts), buckets by
  ``date_bin``; closed buckets are cached (`activity_cache`), so a view reads only the
  newest ones;
- chain heads: a skip scan (recursive CTE) over ``(chain_id, seq)``: one index probe per
  chain instead of a pass over the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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


@dataclass(slots=True)
class BucketCounts:
    """What the overview needs of one time bucket; buckets add up (`merge`)."""

    rows: list[ActivityRow]
    devices: dict[str, int]
    peers: dict[str, int]


ACTIVITY_WORK_MEM = "64MB"

# Two queries per window (cheaper than one pass with three grouping sets over every event:
# 280 ms instead of 480 ms for a day of a million-event week, docs/console.md): counts by
# (outcome, reason, admission) over every event, then the denials alone (the
# (outcome, time DESC) index) by device and by peer host: the address up to its last ':'
# ("203.0.113.5:4711", "[2001:db8::1]:4711"), as the gateway and provisioning record it (a
# string function: three times cheaper than a regular expression here).
_ACTIVITY = """
SELECT date_bin($3::interval, time, $4::timestamptz) AS bucket,
       type = ANY($5::text[]) AS connection, outcome, reason, count(*) AS n
FROM auth_events WHERE time >= $1 AND time < $2
GROUP BY 1, 2, 3, 4
"""

_DENIALS = """
SELECT date_bin($3::interval, time, $4::timestamptz) AS bucket, device_id AS device,
       left(peer_address, -strpos(reverse(peer_address), ':')) AS peer,
       GROUPING(device_id) AS by_device, count(*) AS n
FROM auth_events WHERE outcome = 'denied' AND time >= $1 AND time < $2
GROUP BY GROUPING SETS ((1, 2), (1, 3))
"""


async def activity(
    conn: Connection, *, start: datetime, end: datetime, stride: timedelta
) -> dict[datetime, BucketCounts]:
    """Per bucket of ``[start, end)``: counts by admission, outcome and reason, and the
    denials by device and by peer host (both queries see one snapshot)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # The grouping sets hash in memory; at the default 4 MB they may sort on disk.
        await conn.execute(f"SET LOCAL work_mem = '{ACTIVITY_WORK_MEM}'")
        rows = await conn.fetch(_ACTIVITY, start, end, stride, ORIGIN, list(CONNECTION_TYPES))
        denials = await conn.fetch(_DENIALS, start, end, stride, ORIGIN)
    out: dict[datetime, BucketCounts] = {}
    for r in rows:
        counts = out.setdefault(r["bucket"], BucketCounts([], {}, {}))
        counts.rows.append(
            ActivityRow(r["bucket"], r["connection"], r["outcome"], r["reason"], r["n"])
        )
    for r in denials:
        counts = out.setdefault(r["bucket"], BucketCounts([], {}, {}))
        if r["by_device"] == 0:
            if r["device"] is not None:
                counts.devices[r["device"]] = r["n"]
        elif r["peer"] is not None:
            counts.peers[r["peer"]] = r["n"]
    return out


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
