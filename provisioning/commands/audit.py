"""``devicegate audit``: query, follow, summarise, verify and prune the auth event log.

The logic lives in ``provisioning/audit/``; this module parses options and prints. Output
formats: ``table`` (aligned text that also streams under ``--follow``; a refusal that names
a certificate gets a second, indented line: `provisioning.audit.format.certificate_line`),
``json`` (one object per line, the field names of the API) and ``csv`` (a header, then the
same fields; ``detail`` as JSON).
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from provisioning.audit.checkpoints import read_directory, trust_store
from provisioning.audit.follow import FollowLost, follow
from provisioning.audit.format import FIELDS, certificate_line, csv_cells, record
from provisioning.audit.prune import PruneResult, plan_prune, prune
from provisioning.audit.query import MAX_LIMIT, EventFilter, query_events
from provisioning.audit.summary import Summary, summarize
from provisioning.audit.verify import VerifyReport, verify_chains
from provisioning.commands.common import context, errors, fail, run
from provisioning.commands.records import report_count
from provisioning.db import connect
from schemas.durations import parse_duration
from schemas.events import AuthEvent, EventType, Outcome, Reason, utcnow

group = typer.Typer(help="Query and verify the auth event log.", invoke_without_command=True)

_TABLE = (("time", 23), ("type", 15), ("outcome", 7), ("reason", 24), ("device_id", 20),
          ("peer_address", 21), ("chain", 24))  # fmt: skip


class Format(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="audit")


def parse_when(text: str | None, *, now: datetime, option: str) -> datetime | None:
    """``10m`` (that long ago) or an ISO 8601 time (UTC when no offset is given)."""
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option}: {text!r} is neither a duration (10m, 24h, 7d) nor an ISO timestamp", 2)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _reason(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return Reason(text).value
    except ValueError:
        fail(f"--reason: unknown reason code {text!r}", 2)


class _Printer:
    """Writes events in one format, one at a time, flushing so ``--follow`` is live."""

    def __init__(self, output: Format) -> None:
        self.output = output
        self.started = False
        self._csv = csv.writer(sys.stdout, lineterminator="\n")

    def _header(self) -> None:
        self.started = True
        if self.output is Format.csv:
            self._csv.writerow(FIELDS)
        elif self.output is Format.table:
            sys.stdout.write("  ".join(name.ljust(width) for name, width in _TABLE).rstrip())
            sys.stdout.write("\n")

    def __call__(self, event: AuthEvent) -> None:
        if not self.started:
            self._header()
        if self.output is Format.json:
            sys.stdout.write(json.dumps(record(event), ensure_ascii=False) + "\n")
        elif self.output is Format.csv:  # formats shared with the console (audit.format)
            self._csv.writerow(csv_cells(event))
        else:
            cells = {
                **record(event),
                "time": event.time.astimezone(UTC).isoformat(timespec="milliseconds")[:23],
                "chain": f"{event.chain_id}:{event.seq}",
            }
            line = "  ".join(str(cells.get(name) or "-").ljust(width) for name, width in _TABLE)
            sys.stdout.write(line.rstrip() + "\n")
            certificate = certificate_line(event)
            if certificate is not None:  # a refused certificate: which one, and why
                sys.stdout.write(f"    {certificate}\n")
        sys.stdout.flush()


@group.callback()
def audit(
    ctx: typer.Context,
    device: Annotated[str | None, typer.Option("--device", help="Device id.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Start: a duration ago (10m, 24h) or an ISO time.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End (exclusive), same forms.")] = None,
    type_: Annotated[EventType | None, typer.Option("--type", help="Event type.")] = None,
    outcome: Annotated[Outcome | None, typer.Option(help="allowed or denied.")] = None,
    reason: Annotated[
        str | None, typer.Option(help="Reason code (topic_not_authorized, ...).")
    ] = None,
    peer: Annotated[str | None, typer.Option(help="Peer address or host.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Most events shown (newest).")] = 100,
    output: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep running and show new events.")
    ] = False,
) -> None:
    """List auth events, oldest first, newest last (filters combine with AND)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = context(ctx).settings()
    now = utcnow()
    filters = EventFilter(
        device_id=device,
        since=parse_when(since, now=now, option="--since"),
        until=parse_when(until, now=now, option="--until"),
        type=type_.value if type_ else None,
        outcome=outcome.value if outcome else None,
        reason=_reason(reason),
        peer=peer,
    )
    printer = _Printer(output)

    async def _list() -> None:
        conn = await connect(settings.database_url)
        try:
            if follow_:
                await follow(
                    conn, filters=filters, initial_limit=min(limit, MAX_LIMIT), show=printer,
                    ready=lambda: errors.print("-- following new events (Ctrl-C to stop)"),
                )  # fmt: skip
                return
            events: list[AuthEvent] = []
            cursor: str | None = None
            while len(events) < limit:
                page, cursor = await query_events(
                    conn, filters=filters, limit=min(limit - len(events), MAX_LIMIT), cursor=cursor
                )
                events.extend(page)
                if cursor is None:
                    break
            more = False
            if cursor is not None and limit > 0:  # cut at --limit: does anything older match?
                more = bool((await query_events(conn, filters=filters, limit=1, cursor=cursor))[0])
            for event in reversed(events):
                printer(event)
            if limit > 0:
                report_count(
                    len(events), limit=limit, more=more, noun="events",
                    narrow="--since, --until, --device, --type, --outcome or --reason",
                )  # fmt: skip
        finally:
            await conn.close()

    try:
        run(_list())
    except FollowLost as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@group.command("summary")
def summary(
    ctx: typer.Context,
    since: Annotated[str, typer.Option(help="Window start: duration ago or ISO time.")] = "24h",
    until: Annotated[str | None, typer.Option(help="Window end (exclusive).")] = None,
    top: Annotated[int, typer.Option(min=1, help="Devices and peers listed.")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Counts by outcome and reason, and the devices with the most denials."""
    settings = context(ctx).settings()
    now = utcnow()
    start = parse_when(since, now=now, option="--since")
    end = parse_when(until, now=now, option="--until")
    assert start is not None

    async def _summary() -> Summary:
        conn = await connect(settings.database_url)
        try:
            return await summarize(conn, since=start, until=end, top=top)
        finally:
            await conn.close()

    result = run(_summary())
    if json_output:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        return
    window = f"{result.since.isoformat()} .. {result.until.isoformat() if result.until else 'now'}"
    lines = [f"auth decisions {window}: {result.total}"]
    lines.append(
        "by outcome: "
        + (", ".join(f"{name} {count}" for name, count in sorted(result.by_outcome.items())) or "-")
    )
    lines.append("by reason:")
    lines += [f"  {o:<8} {r:<28} {n:>10}" for o, r, n in result.by_reason] or ["  -"]
    lines.append("devices with the most denials:")
    lines += [f"  {d:<36} {n:>10}" for d, n in result.top_denied_devices] or ["  -"]
    lines.append("peer hosts with the most denials:")
    lines += [f"  {p:<36} {n:>10}" for p, n in result.top_denied_peers] or ["  -"]
    sys.stdout.write("\n".join(lines) + "\n")


@group.command("verify")
def verify(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="Only events since (each chain's first is trusted).")
    ] = None,
    chain: Annotated[str | None, typer.Option(help="Only this chain.")] = None,
    checkpoints: Annotated[
        Path | None,
        typer.Option(
            "--checkpoints",
            help="Also check against the checkpoint files copied outside the database "
            "(every *.jsonl under DIR): finds events deleted with their checkpoints.",
            metavar="DIR",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Verify every hash chain and its signed checkpoints; exit 1 on any gap, edit,
    reordering, broken link, truncation or checkpoint problem.

    Signers are trusted through chain.pem in the PKI directory (--pki-dir), never through
    the database. Chain boundaries and restored ranges are named, not counted as problems.
    """
    settings = context(ctx).settings()
    start = parse_when(since, now=utcnow(), option="--since")
    external = None
    if checkpoints is not None:
        if not checkpoints.is_dir():
            fail(f"--checkpoints: {checkpoints} is not a directory", 2)
        external, unreadable = read_directory(checkpoints)
        for line in unreadable:
            errors.print(f"unreadable checkpoint line {line}")

    async def _verify() -> VerifyReport:
        conn = await connect(settings.database_url)
        try:
            return await verify_chains(
                conn, since=start, chain_id=chain, trust=trust_store(settings.pki_dir),
                external=external,
            )  # fmt: skip
        finally:
            await conn.close()

    report = run(_verify())
    if json_output:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        for notice in report.notices:
            sys.stdout.write(
                f"{notice.kind.upper():<12} chain={notice.chain_id}: {notice.message}\n"
            )
        for finding in report.findings:
            sys.stdout.write(
                f"{finding.kind.upper():<12} chain={finding.chain_id} seq={finding.seq} "
                f"event={finding.event_id or '-'}: {finding.message}\n"
            )
        verdict = "OK" if report.ok else f"{report.findings_total} problem(s)"
        sys.stdout.write(
            f"verified {report.events} events in {report.chains} chains: {verdict} "
            f"(against {report.checkpoints} signed checkpoints)\n"
        )
    if not report.ok:
        raise typer.Exit(1)


@group.command("prune")
def prune_(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option(help="Retention: drop months entirely older than this (180d).")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Drop whole monthly partitions older than the retention, and record the prune."""
    settings = context(ctx).settings()
    try:
        retention: timedelta = parse_duration(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}", 2)

    async def _plan() -> tuple[datetime, list[str], int]:
        conn = await connect(settings.database_url)
        try:
            plan = await plan_prune(conn, older_than=retention)
            return plan.cutoff, plan.partitions, plan.events
        finally:
            await conn.close()

    if not yes:
        cutoff, partitions, count = run(_plan())
        if not partitions:
            sys.stdout.write(f"nothing to prune before {cutoff.isoformat()}\n")
            return
        errors.print(f"would drop {', '.join(partitions)} ({count} events)")
        if not typer.confirm("drop these partitions?", err=True):
            fail("aborted")

    async def _prune() -> PruneResult:
        conn = await connect(settings.database_url)
        try:
            return await prune(conn, older_than=retention, instance=settings.instance_id)
        finally:
            await conn.close()

    result = run(_prune())
    if json_output:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    elif result.partitions:
        sys.stdout.write(
            f"dropped {', '.join(result.partitions)}: {result.events} events before "
            f"{result.cutoff.isoformat()} (prune {result.prune_id}, event {result.event_id})\n"
        )
    else:
        sys.stdout.write(f"nothing to prune before {result.cutoff.isoformat()}\n")
