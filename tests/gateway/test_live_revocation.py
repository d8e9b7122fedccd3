"""Revocation reaches live sessions: provisioning's NOTIFY cuts them within a second, and a
gateway whose revocation state is too old refuses new connections until it is current.

End to end: real PostgreSQL (provisioning's own functions send the NOTIFY), real Mosquitto,
real TLS clients, the `RevocationCache` as the gateway's directory.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.mqtt import Connack, Disconnect, Pingreq, Pingresp
from provisioning import admin
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness
from tests.gateway.live import (
    Live,
    live_gateway,
    provision,
    revoke_certificate,
    supersede,
    wait_for,
)
from tests.helpers import Proxy

CUT_WITHIN = 1.0  # DESIGN.md: revocations cut live sessions within a second
LATENCIES: list[float] = []


@pytest.fixture(scope="module")
def live(harness: Harness) -> Iterator[Live]:
    with live_gateway(harness) as live:
        yield live


def _cut_latency(client: RawClient, version: int, started: float) -> float:
    """Seconds from ``started`` until the gateway ended the session (0x98 on v5)."""
    if version == 5:
        assert client.recv(timeout=CUT_WITHIN + 1) == Disconnect(reason_code=0x98)
    assert client.closed(timeout=CUT_WITHIN + 1)
    latency = time.monotonic() - started
    LATENCIES.append(latency)
    return latency


def _alive(client: RawClient) -> None:
    client.send(Pingreq())
    assert client.recv() == Pingresp()


@pytest.mark.parametrize("version", [4, 5])
def test_revoked_certificate_is_cut_within_a_second(
    harness: Harness, live: Live, make_device: DeviceFactory, version: int
) -> None:
    device, bystander = make_device("revoked"), make_device("bystander")
    mark = harness.mark()
    with (
        RawClient(live.port, device, device.chain, version=version) as client,
        RawClient(live.port, bystander, bystander.chain, version=version) as other,
    ):
        assert client.connect(device.device_id).reason_code == 0
        assert other.connect(bystander.device_id).reason_code == 0
        started = time.monotonic()  # before the transaction: the measure includes it
        revoke_certificate(harness, device)
        latency = _cut_latency(client, version, started)
        assert latency < CUT_WITHIN, f"cut after {latency:.3f} s"
        _alive(other)
    rows = harness.wait_events(2, after=mark, device_id=device.device_id)
    assert [(r["type"], r["outcome"], r["reason"]) for r in rows] == [
        ("connect", "allowed", "ok"),
        ("session_revoked", "denied", "certificate_revoked"),
    ]
    # The cache learnt it from the same notification: the certificate is refused now.
    with RawClient(live.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id).reason_code == (0x05 if version == 4 else 0x87)
    (row,) = harness.wait_events(after=rows[-1]["seq"], device_id=device.device_id)
    assert (row["type"], row["reason"]) == ("connect", "certificate_revoked")


@pytest.mark.parametrize("version", [4, 5])
def test_disabled_device_is_cut_and_enabling_lets_it_back(
    harness: Harness, live: Live, make_device: DeviceFactory, version: int
) -> None:
    device = make_device("disabled")
    mark = harness.mark()
    with RawClient(live.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id).reason_code == 0
        started = time.monotonic()
        provision(harness, admin.disable_device, device.device_id)
        assert _cut_latency(client, version, started) < CUT_WITHIN
    with RawClient(live.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id).reason_code == (0x05 if version == 4 else 0x87)
    heard = live.cache.notifications
    provision(harness, admin.enable_device, device.device_id)
    wait_for(lambda: live.cache.notifications > heard)  # enabling cuts nothing: just listen
    with RawClient(live.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id).reason_code == 0
        _alive(client)
    harness.wait_events(2, after=mark, device_id=device.device_id, reason="ok")
    rows = _decisions(harness.events(mark, device_id=device.device_id))
    assert [(r["type"], r["reason"]) for r in rows] == [
        ("connect", "ok"),
        ("session_revoked", "device_disabled"),
        ("connect", "device_disabled"),
        ("connect", "ok"),
    ]


def test_revoked_device_loses_every_session(
    harness: Harness, live: Live, make_device: DeviceFactory
) -> None:
    """Two clients of one device (the ``bench`` fleet allows ``{device_id}-*``): both cut."""
    device = make_device("gone", fleet="bench")
    mark = harness.mark()
    with (
        RawClient(live.port, device, device.chain, version=5) as first,
        RawClient(live.port, device, device.chain, version=4) as second,
    ):
        assert first.connect(f"{device.device_id}-a").reason_code == 0
        assert second.connect(f"{device.device_id}-b").reason_code == 0
        started = time.monotonic()
        provision(harness, admin.revoke_device, device.device_id)
        assert _cut_latency(first, 5, started) < CUT_WITHIN
        assert _cut_latency(second, 4, started) < CUT_WITHIN
    rows = harness.wait_events(4, after=mark, device_id=device.device_id)
    ends = [(r["type"], r["reason"]) for r in rows if r["type"] != "connect"]
    assert ends == [("session_revoked", "device_revoked")] * 2


def test_superseded_certificate_is_cut_and_the_renewed_one_connects(
    harness: Harness, live: Live, make_device: DeviceFactory
) -> None:
    """Renewal supersedes the old certificate; its session ends (see RevocationCache docs)."""
    old = make_device("renewing")
    mark = harness.mark()
    with RawClient(live.port, old, old.chain, version=5) as client:
        assert client.connect(old.device_id).reason_code == 0
        new = make_device(device_id=old.device_id)  # the renewed certificate, registered
        started = time.monotonic()
        supersede(harness, old, new)
        assert _cut_latency(client, 5, started) < CUT_WITHIN
    with RawClient(live.port, new, new.chain, version=5) as client:
        assert client.connect(new.device_id).reason_code == 0
    with RawClient(live.port, old, old.chain, version=5) as client:
        assert client.connect(old.device_id).reason_code == 0x87
    harness.wait_events(
        after=mark, device_id=old.device_id, reason="certificate_superseded", type="connect"
    )
    rows = _decisions(harness.events(mark, device_id=old.device_id))
    assert [(r["type"], r["reason"], r["cert_serial"]) for r in rows] == [
        ("connect", "ok", old.serial),
        ("session_superseded", "certificate_superseded", old.serial),
        ("connect", "ok", new.serial),
        ("connect", "certificate_superseded", old.serial),
    ]


def test_unreadable_notification_triggers_a_full_reload(harness: Harness, live: Live) -> None:
    reloads = live.cache.reloads
    harness.execute("SELECT pg_notify('devicegate_revocation', 'not json')")
    wait_for(lambda: live.cache.reloads > reloads)
    assert not live.cache.stale()


def test_stale_state_refuses_new_connections_until_postgresql_returns(
    harness: Harness, make_device: DeviceFactory
) -> None:
    """PostgreSQL unreachable (through a cut proxy) beyond ``stale_after``: new connections
    are refused with revocation_state_stale, live ones continue; when it returns, the cache
    reloads (catching a change it missed) and admits again."""
    proxy = Proxy("127.0.0.1", _pg_port(harness.database_url))
    harness.call(proxy.start())
    url = harness.database_url.replace(
        f"127.0.0.1:{_pg_port(harness.database_url)}", f"127.0.0.1:{proxy.port}"
    )
    stale_after = 2.0
    try:
        with live_gateway(
            harness, database_url=url, stale_after=stale_after, retry_max=0.3, timeout=2.0
        ) as live:
            kept, known, newcomer = make_device("kept"), make_device("known"), make_device("new")
            with RawClient(live.port, known, known.chain, version=5) as client:
                assert client.connect(known.device_id).reason_code == 0  # now cached
            mark = harness.mark()
            with RawClient(live.port, kept, kept.chain, version=5) as session:
                assert session.connect(kept.device_id).reason_code == 0
                harness.call(proxy.cut())
                cut_at = time.monotonic()
                # Within the bound a cached device still gets in; one that needs a lookup
                # cannot be looked up, and is refused the same way (fail closed).
                with RawClient(live.port, known, known.chain, version=5) as client:
                    assert client.connect(known.device_id).reason_code == 0
                with RawClient(live.port, newcomer, newcomer.chain, version=5) as client:
                    assert client.connect(newcomer.device_id) == Connack(reason_code=0x88)
                assert not live.cache.stale()
                # A change the gateway cannot hear about while PostgreSQL is away from it.
                provision(harness, admin.disable_device, kept.device_id)
                wait_for(live.cache.stale, timeout=stale_after + 3)
                assert time.monotonic() - cut_at > stale_after - live.cache.heartbeat - 0.1
                for version, code in ((5, 0x88), (4, 0x03)):
                    for device in (known, newcomer):
                        with RawClient(live.port, device, device.chain, version=version) as c:
                            assert c.connect(device.device_id) == Connack(reason_code=code)
                _alive(session)  # existing sessions continue
                harness.call(proxy.restore())
                # Reloaded on reconnection: the missed disable cuts the live session.
                assert session.recv(timeout=5) == Disconnect(reason_code=0x98)
                assert session.closed()
            wait_for(lambda: not live.cache.stale())
            with RawClient(live.port, newcomer, newcomer.chain, version=5) as client:
                assert client.connect(newcomer.device_id).reason_code == 0
            harness.wait_events(after=mark, device_id=newcomer.device_id, reason="ok")
            rows = harness.events(mark)
    finally:
        harness.call(proxy.close())
    rows = _decisions(rows)
    refused = [r for r in rows if r["reason"] == "revocation_state_stale"]
    assert len(refused) == 5
    assert {(r["type"], r["outcome"]) for r in refused} == {("connect", "denied")}
    kept_rows = [(r["type"], r["reason"]) for r in rows if r["device_id"] == kept.device_id]
    assert kept_rows == [("connect", "ok"), ("session_revoked", "device_disabled")]
    new_rows = [(r["type"], r["reason"]) for r in rows if r["device_id"] == newcomer.device_id]
    assert new_rows == [("connect", "revocation_state_stale")] * 3 + [("connect", "ok")]


def test_lookup_racing_a_notification_is_retried(
    harness: Harness, live: Live, make_device: DeviceFactory
) -> None:
    """A row read before a revocation committed must not be cached after its NOTIFY."""
    device = make_device("racing")
    cache = live.cache
    pool = cache._pool
    assert pool is not None
    reads = 0

    class Racing:
        async def fetch(self, *args: Any) -> Any:
            nonlocal reads
            reads += 1
            assert pool is not None
            row = await pool.fetch(*args)
            if reads == 1:  # the revocation commits and is heard while this read is in flight
                await pool.execute(
                    "UPDATE devices SET status = 'disabled' WHERE device_id = $1", device.device_id
                )
                notice = {"kind": "device", "device_id": device.device_id, "status": "disabled"}
                cache._on_notify(None, 0, "devicegate_revocation", json.dumps(notice))
            return row

    async def check() -> object:
        cache._pool = Racing()
        try:
            return await cache.check(
                device_id=device.device_id, fleet=device.fleet, serial=device.serial
            )
        finally:
            cache._pool = pool

    assert harness.call(check()) == "device_disabled"
    assert reads == 2
    # And what is cached is the newer state.
    assert harness.call(check()) == "device_disabled"
    assert reads == 2


def test_report_latency() -> None:
    """Not a check: prints the measured revocation-to-disconnect latencies (-s to see)."""
    if LATENCIES:
        print(
            json.dumps(
                {
                    "cuts": len(LATENCIES),
                    "max_ms": round(max(LATENCIES) * 1000, 1),
                    "mean_ms": round(sum(LATENCIES) / len(LATENCIES) * 1000, 1),
                }
            )
        )


def _decisions(rows: list[Any]) -> list[Any]:
    """Without the ``connection_lost`` ends of clients that just hung up (timing varies)."""
    return [r for r in rows if r["reason"] != "connection_lost"]


def _pg_port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or 5432


def test_a_storm_of_misses_is_looked_up_in_batches(harness: Harness, live: Live) -> None:
    """After a restart every device misses the cache at once: 2,000 concurrent checks are
    answered by a few batched queries, each verdict right, none refused as stale."""
    cache = live.cache
    pool = cache._pool
    assert pool is not None
    count = 2000
    ids = [f"storm-{i:04d}" for i in range(count)]
    serials = [f"5707{i:04x}" for i in range(count)]

    async def seed() -> None:
        assert pool is not None
        await pool.execute("INSERT INTO fleets (name) VALUES ('storm') ON CONFLICT DO NOTHING")
        await pool.execute(
            "INSERT INTO devices (device_id, fleet, status)"
            " SELECT d, 'storm', CASE WHEN n % 10 = 0 THEN 'disabled' ELSE 'active' END"
            " FROM unnest($1::text[]) WITH ORDINALITY AS t(d, n)",
            ids,
        )
        await pool.execute(
            "INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before,"
            " not_after, key_type, pem)"
            " SELECT s, d, md5(s), now(), now() + interval '1 day', 'ec', ''"
            " FROM unnest($1::text[], $2::text[]) AS t(s, d)",
            serials,
            ids,
        )

    async def storm() -> list[object]:
        before = cache._lookups.queries
        verdicts = await asyncio.gather(
            *(
                cache.check(device_id=d, fleet="storm", serial=s)
                for d, s in zip(ids, serials, strict=True)
            ),
            cache.check(device_id="storm-unknown", fleet="storm", serial="00"),
        )
        return [cache._lookups.queries - before, *verdicts]

    harness.call(seed())
    queries, *verdicts = harness.call(storm())
    assert verdicts[-1] == "device_unknown"
    expected = ["device_disabled" if (i + 1) % 10 == 0 else "ok" for i in range(count)]
    assert verdicts[:-1] == expected
    assert isinstance(queries, int) and 1 <= queries <= 5, queries
