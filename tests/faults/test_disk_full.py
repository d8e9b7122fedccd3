"""Issue 11, faults: the disk under the spool fills up (a real ENOSPC on a tiny tmpfs, not
the spool's size bound). New connections are refused with ``event_log_unavailable``, the
worker stays up, no event already spooled is lost, and once space is freed connections
are admitted again and every event reaches PostgreSQL with the chain intact. Each
refusal is in the event table by its reason: as its own row while the active segment
had room, counted in the ``events_lost`` event for the rest.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.conftest import Pki
from tests.events.conftest import fill, tmpfs
from tests.faults.conftest import (
    Attempt,
    Client,
    assert_sink_alive,
    connect_events,
    gateway_process,
    landed,
    query,
    register_devices,
    verify,
    wait_until,
)

REFUSED = {4: "connack:0x03", 5: "connack:0x88"}
REFUSAL = ("connect", "denied", "event_log_unavailable")


def test_a_full_spool_disk_refuses_then_recovers(
    pki: Pki, fault_db: str, mosquitto_port: int, tmp_path: Path
) -> None:
    (device,) = asyncio.run(register_devices(fault_db, pki, tmp_path, 1))
    client = Client(device)
    attempts: list[Attempt] = []
    with (
        tmpfs(tmp_path / "spoolfs", 1024 * 1024) as fs,
        gateway_process(
            pki=pki,
            database_url=fault_db,
            upstream=mosquitto_port,
            work=tmp_path / "gw",
            workers=1,
            env={
                "DEVICEGATE_SPOOL_DIR": str(fs / "spool"),
                # 8 KiB segments; the size bound (64 KiB) is never what refuses here.
                "DEVICEGATE_SPOOL_MAX_BYTES": str(64 * 1024),
            },
        ) as served,
    ):

        def stored(client_ids: set[str]) -> Callable[[], Awaitable[object]]:
            return functools.partial(landed, fault_db, served.instance, client_ids)

        async def scenario() -> tuple[list[Attempt], list[Attempt], list[Attempt]]:
            warm = await client.attempt(served.port, "warm")
            assert warm.ok, (warm, served.log_text())
            assert await wait_until(stored({warm.client_id}), 10)
            filling = [warm]
            filler = fill(fs)
            for n in range(100):  # admitted while the active segment has room
                attempt = await client.attempt(served.port, f"fill{n}", version=4 + n % 2)
                filling.append(attempt)
                if not attempt.ok:
                    break
            # Refused from then on, on both protocol versions, more than the room left
            # in the active segment can record one by one.
            refused = [filling.pop()]
            for n in range(12):
                refused.append(await client.attempt(served.port, f"full{n}", version=4 + n % 2))

            filler.unlink()
            recovered = await client.until_admitted(served.port)
            for n in range(3):  # and stays open
                recovered.append(await client.attempt(served.port, f"after{n}"))
            return filling, refused, recovered

        worker = served.workers()
        filling, refused, recovered = asyncio.run(scenario())
        attempts += filling + refused + recovered
        log = served.log_text(tail=10**8)

        assert served.workers() == worker, "the worker restarted"
        assert served.process.poll() is None
        assert_sink_alive(log)
        assert "spool disk full" in log, log[-4000:]  # a real ENOSPC, not the size bound
        assert all(a.ok for a in filling) and len(filling) < 60, Counter(a.outcome for a in filling)
        assert [a.outcome for a in refused] == [REFUSED[a.version] for a in refused], log[-4000:]
        assert recovered[-4:] and all(a.ok for a in recovered[-4:]), [a.outcome for a in recovered]

        admitted = {a.client_id for a in attempts if a.ok}
        assert asyncio.run(wait_until(stored(admitted), 20)), log[-4000:]

        async def loss_recorded() -> list[str]:
            found = await query(
                fault_db,
                "SELECT detail::text FROM auth_events WHERE instance = $1 AND type = 'events_lost'",
                served.instance,
            )
            return [r["detail"] for r in found]

        summaries = [json.loads(d) for d in asyncio.run(wait_until(loss_recorded, 10))]
        rows = asyncio.run(connect_events(fault_db, served.instance))

    connects = Counter(r["client_id"] for r in rows if r["type"] == "connect")
    assert all(connects[c] == 1 for c in admitted), connects
    allowed = {r["client_id"] for r in rows if r["type"] == "connect" and r["outcome"] == "allowed"}
    assert allowed == admitted  # no refusal recorded as admitted, no admission lost

    # Every refusal by its reason: one row each, or counted in an events_lost event.
    refused_ids = {a.client_id for a in attempts if not a.ok}
    rows_by_reason = {
        r["client_id"] for r in rows if (r["type"], r["outcome"], r["reason"]) == REFUSAL
    }
    assert rows_by_reason <= refused_ids
    counted = sum(
        item["count"]
        for summary in summaries
        for item in summary["lost"]
        if (item["type"], item["outcome"], item["reason"]) == REFUSAL
    )
    assert rows_by_reason and counted, (rows_by_reason, summaries)
    assert len(rows_by_reason) + counted == len(refused_ids), (rows_by_reason, summaries)
    assert [r["reason"] for r in rows if r["type"] == "events_lost"] == [
        "event_log_unavailable"
    ] * len(summaries)

    report = asyncio.run(verify(fault_db))
    assert report.ok, report.to_dict()
