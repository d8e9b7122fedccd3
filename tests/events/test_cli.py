"""The ``devicegate audit`` commands: formats and filters, summary, verify and prune exit
codes (in process), and ``--follow`` (a real subprocess reading a real sink's events)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from typer.testing import CliRunner

from gateway.events.sink import SpoolSink
from provisioning.commands.audit import FIELDS
from provisioning.commands.cli import app
from schemas.events import AuthEvent, EventType, Outcome, Reason

runner = CliRunner()


def _devicegate(url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.stdout


async def _record(
    url: str, spool_dir: Path, events: list[AuthEvent], chain: str = "gw-cli/w0"
) -> None:
    async with SpoolSink(database_url=url, spool_dir=spool_dir, chain_id=chain) as sink:
        for event in events:
            await sink.record(event)


def _sample(make: Callable[..., AuthEvent]) -> list[AuthEvent]:
    now = datetime.now(UTC)
    return [
        make(1, time=now - timedelta(hours=2)),
        make(2, time=now - timedelta(minutes=5)),
        make(3, type=EventType.PUBLISH, outcome=Outcome.DENIED,
             reason=Reason.TOPIC_NOT_AUTHORIZED, device_id="dev-bad", peer_address="10.9.9.9:5000",
             time=now - timedelta(minutes=4)),
        make(4, type=EventType.SUBSCRIBE, outcome=Outcome.DENIED,
             reason=Reason.TOPIC_NOT_AUTHORIZED, device_id="dev-bad", peer_address="10.9.9.9:5001",
             time=now - timedelta(minutes=3)),
        make(5, type=EventType.TLS_HANDSHAKE, outcome=Outcome.DENIED,
             reason=Reason.CERTIFICATE_EXPIRED, device_id="dev-old",
             time=now - timedelta(minutes=2)),
    ]  # fmt: skip


def test_formats_and_filters(
    scratch_url: str, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    sample = _sample(events)
    asyncio.run(_record(scratch_url, tmp_path / "s", sample))
    wanted = [str(sample[2].id), str(sample[3].id)]
    filters = ["--device", "dev-bad", "--since", "30m", "--outcome", "denied",
               "--reason", "topic_not_authorized", "--peer", "10.9.9.9"]  # fmt: skip

    code, out = _devicegate(scratch_url, "audit", *filters, "--format", "json")
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["id"] for line in lines] == wanted  # oldest first
    assert list(lines[0]) == list(FIELDS)
    assert lines[0]["detail"] == {"n": 3, "note": "süd"} and lines[0]["seq"] == 3

    code, out = _devicegate(
        scratch_url, "audit", *filters, "--type", "subscribe", "--format", "csv"
    )
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row["id"] for row in rows] == wanted[1:]
    assert json.loads(rows[0]["detail"]) == {"n": 4, "note": "süd"}
    assert tuple(rows[0]) == FIELDS

    code, out = _devicegate(scratch_url, "audit", *filters, "--format", "table")
    assert code == 0, out
    assert out.splitlines()[0].split()[:4] == ["time", "type", "outcome", "reason"]
    assert len(out.splitlines()) == 3 and "topic_not_authorized" in out

    code, out = _devicegate(scratch_url, "audit", "--until", "1h", "--format", "json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [str(sample[0].id)]
    code, out = _devicegate(scratch_url, "audit", "--limit", "2", "--format", "json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [str(e.id) for e in sample[3:]]
    code, _ = _devicegate(scratch_url, "audit", "--since", "yesterday-ish")
    assert code == 2


def test_summary(scratch_url: str, tmp_path: Path, events: Callable[..., AuthEvent]) -> None:
    asyncio.run(_record(scratch_url, tmp_path / "s", _sample(events)))
    code, out = _devicegate(scratch_url, "audit", "summary", "--since", "1h", "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["total"] == 4
    assert summary["by_outcome"] == {"allowed": 1, "denied": 3}
    assert summary["by_reason"][0] == {
        "outcome": "denied",
        "reason": "topic_not_authorized",
        "count": 2,
    }
    assert summary["top_denied_devices"][0] == {"device_id": "dev-bad", "count": 2}
    code, out = _devicegate(scratch_url, "audit", "summary", "--since", "24h")
    assert code == 0 and "dev-bad" in out and "auth decisions" in out


def test_verify_and_prune_exit_codes(
    scratch_url: str, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    asyncio.run(_record(scratch_url, tmp_path / "s", [events(i) for i in range(5)]))
    code, out = _devicegate(scratch_url, "audit", "verify")
    assert code == 0 and "verified 5 events in 1 chains: OK" in out

    async def tamper() -> None:
        conn = await asyncpg.connect(scratch_url)
        await conn.execute("UPDATE auth_events SET device_id = 'evil' WHERE seq = 3")
        await conn.close()

    asyncio.run(tamper())
    code, out = _devicegate(scratch_url, "audit", "verify", "--json")
    assert code == 1
    report = json.loads(out)
    assert [(f["kind"], f["seq"]) for f in report["findings"]] == [("altered", 3)]

    code, out = _devicegate(scratch_url, "audit", "prune", "--older-than", "180d", "--yes")
    assert code == 0 and "nothing to prune" in out


async def test_follow_shows_a_new_event_within_a_second(
    scratch_url: str, tmp_path: Path, events: Callable[..., AuthEvent]
) -> None:
    await _record(scratch_url, tmp_path / "s", [events(1, device_id="dev-follow")])
    script = Path(sys.executable).with_name("devicegate")
    command = (
        [str(script)] if script.exists() else [sys.executable, "-m", "provisioning.commands.cli"]
    )
    process = await asyncio.create_subprocess_exec(
        *command, "audit", "--follow", "--format", "json",
        "--device", "dev-follow",
        env={**os.environ, "DEVICEGATE_DATABASE_URL": scratch_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        first = await asyncio.wait_for(process.stdout.readline(), 15)
        assert json.loads(first)["device_id"] == "dev-follow"  # the initial page
        assert b"following" in await asyncio.wait_for(process.stderr.readline(), 5)
        async with SpoolSink(
            database_url=scratch_url, spool_dir=tmp_path / "s", chain_id="gw-cli/w0"
        ) as sink:
            for index in (2, 3):
                await sink.record(events(index, device_id="dev-other"))
                fresh = events(index, device_id="dev-follow")
                await sink.record(fresh)
                recorded = time.monotonic()
                line = await asyncio.wait_for(process.stdout.readline(), 1.0)
                assert json.loads(line)["id"] == str(fresh.id)
                assert time.monotonic() - recorded < 1.0
    finally:
        process.terminate()
        await process.wait()
