"""Counting the auth event log over a window (``devicegate audit summary``, dashboards).

Three aggregate queries over ``time >= since`` (and ``< until``), each served by the
``(outcome|reason, time)`` indexes on recent partitions. They count decisions, not rows
(`counting.DECISIONS`: a throttled summary of 600 refusals counts 600), and group peers by
host (`counting.PEER_HOST`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from provisioning.audit.counting import DECISIONS, PEER_HOST

Connection = Any  # asyncpg.Connection


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts by outcome and reason, and who was denied most, over ``[since, until)``."""

    since: datetime
    until: datetime | None
    total: int
    by_outcome: dict[str, int]
    by_reason: list[tuple[str, str, int]]
    top_denied_devices: list[tuple[str, int]]
    top_denied_peers: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "total": self.total,
            "by_outcome": self.by_outcome,
            "by_reason": [
                {"outcome": outcome, "reason": reason, "count": count}
                for outcome, reason, count in self.by_reason
            ],
            "top_denied_devices": [
                {"device_id": device, "count": count} for device, count in self.top_denied_devices
            ],
            "top_denied_peers": [
                {"peer_host": peer, "count": count} for peer, count in self.top_denied_peers
            ],
        }


async def summarize(
    conn: Connection, *, since: datetime, until: datetime | None = None, top: int = 10
) -> Summary:
    """Aggregate the decisions of ``[since, until)``."""
    window = "time >= $1 AND ($2::timestamptz IS NULL OR time < $2)"
    n = f"sum({DECISIONS})::bigint AS n"
    by_reason = await conn.fetch(
        f"SELECT outcome, reason, {n} FROM auth_events WHERE {window} "  # noqa: S608
        "GROUP BY outcome, reason ORDER BY n DESC, outcome, reason",
        since, until,
    )  # fmt: skip
    devices = await conn.fetch(
        f"SELECT device_id, {n} FROM auth_events WHERE {window} "  # noqa: S608
        "AND outcome = 'denied' AND device_id IS NOT NULL "
        "GROUP BY device_id ORDER BY n DESC, device_id LIMIT $3",
        since, until, top,
    )  # fmt: skip
    peers = await conn.fetch(
        f"SELECT {PEER_HOST} AS host, {n} FROM auth_events WHERE {window} "  # noqa: S608
        "AND outcome = 'denied' AND peer_address IS NOT NULL "
        "GROUP BY host ORDER BY n DESC, host LIMIT $3",
        since, until, top,
    )  # fmt: skip
    by_outcome: dict[str, int] = {}
    for row in by_reason:
        by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + row["n"]
    return Summary(
        since=since,
        until=until,
        total=sum(by_outcome.values()),
        by_outcome=by_outcome,
        by_reason=[(row["outcome"], row["reason"], row["n"]) for row in by_reason],
        top_denied_devices=[(row["device_id"], row["n"]) for row in devices],
        top_denied_peers=[(row["host"], row["n"]) for row in peers],
    )
