"""Issue 5: a gateway whose spool fills while PostgreSQL is unreachable refuses new
sessions (``event_log_unavailable``: CONNACK 0x03 on MQTT 3.1.1, 0x88 on MQTT 5) rather
than admit unaudited ones, and admits again once the database is back and the spool has
drained. Every admitted session's ``connect`` event lands, once, and so does every
refusal (issue 11: each refusal asserted by its reason in the event table): admissions
stop at the spool's soft limit and the reserve above it holds the refusals.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.conftest import Pki
from tests.faults.conftest import (
    Attempt,
    Client,
    ThreadedProxy,
    assert_sink_alive,
    connect_events,
    gateway_process,
    landed,
    register_devices,
    verify,
    wait_until,
)

SPOOL_MAX_BYTES = 64 * 1024  # 8 KiB segments; admissions stop at 56 KiB, about 70 events
REFUSED = {4: "connack:0x03", 5: "connack:0x88"}


def test_full_spool_refuses_then_recovers(
    pki: Pki, fault_db: str, mosquitto_port: int, tmp_path: Path
) -> None:
    (device,) = asyncio.run(register_devices(fault_db, pki, tmp_path, 1))
    client = Client(device)
    proxy = ThreadedProxy(fault_db)
    attempts: list[Attempt] = []
    try:
        with gateway_process(
            pki=pki,
            database_url=proxy.url,
            upstream=mosquitto_port,
            work=tmp_path / "gw",
            workers=1,
            env={
                "DEVICEGATE_SPOOL_MAX_BYTES": str(SPOOL_MAX_BYTES),
                # The outage must fill the spool before the revocation state goes stale.
                "DEVICEGATE_REVOCATION_STALE_AFTER": "60s",
            },
        ) as served:

            def stored(client_ids: set[str]) -> Callable[[], Awaitable[object]]:
                return functools.partial(landed, fault_db, served.instance, client_ids)

            async def scenario() -> tuple[list[Attempt], list[Attempt], list[Attempt]]:
                # The device is admitted (and cached by the revocation cache) while the
                # database is reachable.
                warm = await client.attempt(served.port, "warm")
                attempts.append(warm)
                assert warm.ok, (warm, served.log_text())
                assert await wait_until(stored({warm.client_id}), 10)

                proxy.cut()
                filling: list[Attempt] = []
                for n in range(200):  # admitted until the spool is full
                    attempt = await client.attempt(served.port, f"fill{n}", version=4 + n % 2)
                    filling.append(attempt)
                    if not attempt.ok:
                        break
                refused = [filling[-1]]
                for n in range(4):  # and refused from then on, on both protocol versions
                    refused.append(await client.attempt(served.port, f"full{n}", version=4 + n % 2))

                proxy.restore()
                recovered = await client.until_admitted(served.port)
                return filling[:-1], refused, recovered

            filling, refused, recovered = asyncio.run(scenario())
            attempts += filling + refused + recovered
            log = served.log_text()

            assert filling and all(a.ok for a in filling), Counter(a.outcome for a in filling)
            assert len(filling) < 150, "the spool never filled"
            assert [a.outcome for a in refused] == [REFUSED[a.version] for a in refused], log
            if not (recovered and recovered[-1].ok):
                assert_sink_alive(served.log_text(tail=10**8))
            assert recovered and recovered[-1].ok, ([a.outcome for a in recovered], log)

            admitted = {a.client_id for a in attempts if a.ok}
            assert asyncio.run(wait_until(stored(admitted), 20)), log
            rows = asyncio.run(connect_events(fault_db, served.instance))
    finally:
        proxy.close()

    connects = Counter(r["client_id"] for r in rows if r["type"] == "connect")
    assert all(connects[c] == 1 for c in admitted), connects
    allowed = {r["client_id"] for r in rows if r["type"] == "connect" and r["outcome"] == "allowed"}
    assert allowed == admitted  # no refused attempt was recorded as admitted

    report = asyncio.run(verify(fault_db))
    assert report.ok, report.to_dict()

    # The refusals themselves, by reason: admissions stop at the soft limit, so the
    # reserve above it holds every refusal (nothing had to be counted as lost).
    refused_ids = [a.client_id for a in attempts if not a.ok]
    refusals = Counter(
        r["client_id"]
        for r in rows
        if (r["type"], r["outcome"], r["reason"]) == ("connect", "denied", "event_log_unavailable")
    )
    assert len(refused_ids) >= 5
    assert all(refusals[c] == 1 for c in refused_ids), (refused_ids, refusals)
    assert not [r for r in rows if r["type"] == "events_lost"]
