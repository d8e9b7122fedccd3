"""A database restored from an older backup lacks seqs this spool already shipped
("database behind spool"): the sink says so loudly at start, in a log line, an
``events_missing`` event and the ``devicegate_events_missing_total`` metric. Real
PostgreSQL, the real sink, the gateway's metrics read through Prometheus text."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.events.sink import SpoolSink
from gateway.telemetry import GatewayMetrics
from schemas.events import AuthEvent, uuid7
from schemas.telemetry import setup_telemetry


async def test_a_database_behind_the_spool_is_reported_by_event_log_and_metric(
    database_url: str,
    db: asyncpg.Connection,
    tmp_path: Path,
    events: Callable[..., AuthEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    chain = f"gw-behind/{uuid7().hex[:8]}"
    spool_dir = tmp_path / "s"
    async with SpoolSink(database_url=database_url, spool_dir=spool_dir, chain_id=chain) as sink:
        for i in range(10):
            await sink.record(events(i))
    # The database comes back from a backup taken after seq 6 was stored.
    await db.execute("DELETE FROM auth_events WHERE chain_id = $1 AND seq > 6", chain)
    with caplog.at_level(logging.ERROR, logger="devicegate"):
        async with SpoolSink(
            database_url=database_url, spool_dir=spool_dir, chain_id=chain
        ) as sink:
            assert sink.stats.events_missing_total == 4
            telemetry = setup_telemetry(
                service_name="test", instance_id="gw-behind/w0", prometheus=True, otlp=False
            )
            try:
                metrics = GatewayMetrics(meter=telemetry.meter, tracer=telemetry.tracer)
                metrics.watch_sink(lambda: sink.stats)
                text = telemetry.prometheus_text()
            finally:
                telemetry.shutdown()
    assert "devicegate_events_missing_total 4\n" in text
    assert any("DATABASE BEHIND SPOOL" in r.getMessage() for r in caplog.records)
    missing = await db.fetch(
        "SELECT reason, detail FROM auth_events WHERE chain_id = $1 AND type = 'events_missing'",
        chain,
    )
    assert [(r["reason"], json.loads(r["detail"])["count"]) for r in missing] == [
        ("database_behind_spool", 4)
    ]
