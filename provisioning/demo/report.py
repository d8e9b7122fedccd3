"""The demo's audit: wait for the gateway's events to land, then show, summarise and verify.

The gateway records to a local spool and ships to PostgreSQL in the background, so the
refusals it just made reach ``auth_events`` a moment later: `wait_for_reasons` polls with a
bound instead of assuming they are there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from rich.console import Console
from rich.table import Table

from provisioning.audit.summary import Summary, summarize
from provisioning.audit.verify import VerifyReport, verify_chains

EVENT_WAIT = 20.0
"""Seconds to wait for the gateway's events to reach PostgreSQL."""

ROUTINE = frozenset({"enroll", "connect", "session_end", "token"})
"""Allowed event types that the table leaves out (the summary counts them)."""


@dataclass(frozen=True, slots=True)
class Audit:
    """What the audit step found."""

    recorded: frozenset[str]
    missing: tuple[tuple[str, ...], ...]
    summary: Summary
    verify: VerifyReport

    @property
    def ok(self) -> bool:
        return not self.missing and self.verify.ok


async def _reasons(conn: asyncpg.Connection, since: datetime) -> frozenset[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT reason FROM auth_events WHERE time >= $1 AND outcome = 'denied'", since
    )
    return frozenset(row["reason"] for row in rows)


async def wait_for_reasons(
    conn: asyncpg.Connection,
    since: datetime,
    expected: Sequence[tuple[str, ...]],
    *,
    within: float = EVENT_WAIT,
) -> tuple[frozenset[str], tuple[tuple[str, ...], ...]]:
    """Poll until one reason of each group is recorded as a denial (or the time is up).

    Returns:
        The denial reasons recorded, and the groups still missing.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        recorded = await _reasons(conn, since)
        missing = tuple(group for group in expected if recorded.isdisjoint(group))
        if not missing or loop.time() > deadline:
            return recorded, missing
        await asyncio.sleep(0.1)


def _detail(value: object) -> str:
    detail = json.loads(value) if isinstance(value, str) else value
    if not isinstance(detail, dict):
        return ""
    keys = ("topic", "filter", "error", "message", "actor", "target", "verify_code")
    parts = [f"{key}={detail[key]}" for key in keys if key in detail]
    return " ".join(parts)[:60]


async def events_table(conn: asyncpg.Connection, since: datetime) -> tuple[Table, int]:
    """The non-routine events since ``since``; and how many routine ones were left out."""
    rows = await conn.fetch(
        "SELECT time, type, outcome, reason, device_id, client_id, detail, chain_id, seq "
        "FROM auth_events WHERE time >= $1 ORDER BY time, chain_id, seq",
        since,
    )
    table = Table(title="auth events (decisions other than routine enroll/connect/end)",
                  header_style="bold", expand=False)  # fmt: skip
    table.add_column("time", no_wrap=True)
    table.add_column("type", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("device", overflow="fold")
    table.add_column("detail", overflow="fold")
    hidden = 0
    for row in rows:
        if row["outcome"] == "allowed" and row["type"] in ROUTINE:
            hidden += 1
            continue
        style = "red" if row["outcome"] == "denied" else "green"
        table.add_row(
            row["time"].strftime("%H:%M:%S.%f")[:12],
            row["type"],
            f"[{style}]{row['outcome']}[/{style}]",
            row["reason"],
            row["device_id"] or "-",
            _detail(row["detail"]),
        )
    return table, hidden


def summary_table(summary: Summary) -> Table:
    table = Table(title=f"summary by reason ({summary.total} events)", header_style="bold")
    table.add_column("outcome", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("events", justify="right", no_wrap=True)
    for outcome, reason, count in summary.by_reason:
        style = "red" if outcome == "denied" else "green"
        table.add_row(f"[{style}]{outcome}[/{style}]", reason, str(count))
    return table


async def audit(
    database_url: str, since: datetime, expected: Sequence[tuple[str, ...]], console: Console
) -> Audit:
    """Wait for the expected denials, print the events, the summary and the verification."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        recorded, missing = await wait_for_reasons(conn, since, expected)
        table, hidden = await events_table(conn, since)
        console.print(table)
        console.print(
            f"[dim]{hidden} routine events (enroll, connect, session_end, token) not shown; "
            "`devicegate audit` lists every one[/dim]"
        )
        summary = await summarize(conn, since=since)
        console.print(summary_table(summary))
        report = await verify_chains(conn)
    finally:
        await conn.close()
    for finding in report.findings:
        console.print(
            f"[red]{finding.kind}[/red] {finding.chain_id}:{finding.seq} {finding.message}"
        )
    verdict = "[green]OK[/green]" if report.ok else f"[red]{report.findings_total} problem(s)[/red]"
    console.print(
        f"audit verify: verified {report.events} events in {report.chains} chains: {verdict}",
        soft_wrap=True,
    )
    return Audit(recorded, missing, summary, report)
