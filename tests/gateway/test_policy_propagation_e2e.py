"""A policy change takes effect on every gateway instance within a second (p99).

Three real ``devicegate serve gateway`` instances (``POLICY_SOURCE=database``), one
PostgreSQL, one Mosquitto, real TLS devices. Each round: the policy allows a fleet filter,
an MQTT 5 and an MQTT 3.1.1 device per instance subscribe to it (persistent sessions),
then a committed change (``provisioning.policies.apply_policy``, its NOTIFY) forbids it.
Every session must be ended: the v5 device told (DISCONNECT 0x87 naming the filter), the
3.1.1 connection closed. Latency per change: from before the commit to the last session's
enforcement. After the rounds a message published to the fleet topic is not delivered to
a returning persistent session (the UNSUBSCRIBE reached the broker), and the events of
every effect are in the audit log.

``make test`` runs 20 changes; the 100-change run is ``slow`` (opt-in:
``RUN_SLOW_TESTS=1 pytest -m slow``). bench/policy_propagation.py prints the same
figures with each gateway's CPU per change.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.mqtt import NEED_DATA, Connack, Connect, Disconnect, Suback, Subscribe, decode, encode
from gateway.mqtt.packets import Publish, Subscription
from gateway.mqtt.properties import Properties, PropertyId
from provisioning import policies
from tests.conftest import Pki
from tests.gateway.clients import client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.policy_docs import fleet_document
from tests.gateway.served import Served, serve_gateway

pytestmark = pytest.mark.usefixtures("forget_policies")

WITHIN = 1.0  # issue 23: p99 from commit to enforcement on every instance
ACTOR = {"actor": "test", "instance": "test-propagation"}


def _document(fleet: str, *, wide: bool) -> dict[str, Any]:
    """Wide: the fleet's topics allowed; narrow: denied by the statement ``deny-fleet``."""
    return fleet_document(fleet_topics=True, deny_fleet=not wide)


@pytest.fixture(scope="module")
def three(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Served]]:
    env = {"DEVICEGATE_POLICY_SOURCE": "database"}
    with (
        serve_gateway(
            pki=pki, database_url=database_url, upstream_port=mosquitto_port, workers=1,
            directory=tmp_path_factory.mktemp("gw-a"), name="policy-a", env=env,
        ) as a,
        serve_gateway(
            pki=pki, database_url=database_url, upstream_port=mosquitto_port, workers=1,
            directory=tmp_path_factory.mktemp("gw-b"), name="policy-b", env=env,
        ) as b,
        serve_gateway(
            pki=pki, database_url=database_url, upstream_port=mosquitto_port, workers=2,
            directory=tmp_path_factory.mktemp("gw-c"), name="policy-c", env=env,
        ) as c,
    ):  # fmt: skip
        yield [a, b, c]


class Session:
    """One device's MQTT session over TLS (asyncio streams), watched until it ends."""

    def __init__(self, device: Device, chain: Path, port: int, version: int) -> None:
        self.device, self.chain, self.port, self.version = device, chain, port, version
        self.buf = b""

    async def open(self, *filters: str) -> Connack:
        context: ssl.SSLContext = client_context(self.device, self.chain)
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=context, server_hostname="localhost"
        )
        properties = (
            Properties(((PropertyId.SESSION_EXPIRY_INTERVAL, 600),))
            if self.version == 5
            else Properties(())
        )
        connect = Connect(
            protocol_level=self.version,
            client_id=self.device.device_id,
            clean_start=False,
            properties=properties,
        )
        self.writer.write(encode(connect, version=self.version))
        connack = await self.packet()
        assert isinstance(connack, Connack) and connack.reason_code == 0, connack
        if filters:
            subscriptions = tuple(Subscription(topic_filter=f, qos=1) for f in filters)
            self.writer.write(
                encode(Subscribe(packet_id=1, subscriptions=subscriptions), version=self.version)
            )
            suback = await self.packet()
            assert isinstance(suback, Suback), suback
            self.granted = suback.reason_codes
        return connack

    async def packet(self, timeout: float = 5.0) -> Any:
        """The next packet; None at the end of the connection."""
        async with asyncio.timeout(timeout):
            while True:
                if self.buf:
                    result = decode(self.buf, version=self.version)
                    if result is not NEED_DATA:
                        packet, used = result
                        self.buf = self.buf[used:]
                        return packet
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    data = b""
                if not data:
                    return None
                self.buf += data

    async def ended(self) -> tuple[float, Any]:
        """When the gateway ended the session, and the DISCONNECT it sent (v5) or None."""
        told = None
        while True:
            packet = await self.packet(timeout=WITHIN + 4)
            if packet is None:
                return time.monotonic(), told
            if isinstance(packet, Disconnect):
                told = packet

    def close(self) -> None:
        self.writer.close()


async def _apply(url: str, fleet: str, *, wide: bool) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        name = f"prop-{fleet}"
        result = await policies.apply_policies(
            conn, {name: _document(fleet, wide=wide)}, attach=[(name, "fleet", fleet)], **ACTOR
        )
    finally:
        await conn.close()
    return result.version


async def _rounds(
    url: str, gateways: list[Served], devices: list[tuple[Device, int]], chain: Path,
    fleet: str, changes: int,
) -> list[float]:  # fmt: skip
    latencies = []
    fleet_filter = f"fleets/{fleet}/#"
    for _ in range(changes):
        await _apply(url, fleet, wide=True)
        sessions = []
        for index, (device, version) in enumerate(devices):
            port = gateways[index % len(gateways)].port
            deadline = time.monotonic() + 5
            while True:  # until this instance has heard the widening change
                session = Session(device, chain, port, version)
                await session.open(f"devices/{device.device_id}/#", fleet_filter)
                if all(code < 0x80 for code in session.granted):
                    break
                session.close()
                assert time.monotonic() < deadline, "the widening change never arrived"
                await asyncio.sleep(0.05)
            sessions.append(session)
        watches = [asyncio.create_task(s.ended()) for s in sessions]
        await asyncio.sleep(0.05)
        started = time.monotonic()  # before the commit: the measure includes it
        version = await _apply(url, fleet, wide=False)
        ends = await asyncio.gather(*watches)
        latencies.append(max(at for at, _ in ends) - started)
        for session, (_, told) in zip(sessions, ends, strict=True):
            if session.version == 5:
                assert isinstance(told, Disconnect) and told.reason_code == 0x87, told
                reason = told.properties.reason_string or ""
                assert fleet_filter in reason and f"policy version {version}" in reason
            else:
                assert told is None
            session.close()
    return latencies


def _publish(port: int, topic: str, payload: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic,
         "-m", payload, "-i", f"pub-{secrets.token_hex(3)}"],
        check=True, timeout=10,
    )  # fmt: skip


async def _returning(device: Device, chain: Path, port: int, version: int) -> list[Publish]:
    session = Session(device, chain, port, version)
    connack = await session.open()
    assert connack.session_present
    got = []
    with_timeout = 1.0
    while True:
        try:
            packet = await session.packet(timeout=with_timeout)
        except TimeoutError:
            break
        if isinstance(packet, Publish):
            got.append(packet)
    session.close()
    return got


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(20, id="20-changes"),
        pytest.param(
            100,
            id="100-changes",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    not os.environ.get("RUN_SLOW_TESTS"),
                    reason="slow: RUN_SLOW_TESTS=1 pytest -m slow",
                ),
            ],
        ),
    ],
)
def test_a_policy_change_revokes_subscriptions_on_all_three_instances(
    harness: Harness,
    three: list[Served],
    make_device: DeviceFactory,
    pki: Pki,
    mosquitto_port: int,
    changes: int,
) -> None:
    fleet = f"prop-{secrets.token_hex(3)}"
    devices = [(make_device(f"p{i}", fleet=fleet), 5 if i % 2 == 0 else 4) for i in range(6)]
    # Instance i gets devices i and i + 3: one v5 and one 3.1.1 each.
    latencies = asyncio.run(
        _rounds(harness.database_url, three, devices, pki.chain, fleet, changes)
    )
    p50, p99 = _pct(latencies, 0.5), _pct(latencies, 0.99)
    print(f"\n{changes} changes over 3 instances: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    assert p99 <= WITHIN, f"p99 {p99:.3f} s: {sorted(latencies)[-5:]}"
    # The broker lost the subscription: a message to the fleet topic does not reach the
    # returning persistent session; one to its own topic does.
    device, version = devices[0]
    _publish(mosquitto_port, f"fleets/{fleet}/news", "revoked")
    _publish(mosquitto_port, f"devices/{device.device_id}/cmd", "kept")
    got = asyncio.run(_returning(device, pki.chain, three[0].port, version))
    assert [(p.topic, bytes(p.payload)) for p in got] == [
        (f"devices/{device.device_id}/cmd", b"kept")
    ]
    # One subscription_revoked and one session_ended_by_policy per session and change.
    ids = [d.device_id for d, _ in devices]
    expected = changes * len(devices)
    deadline = time.monotonic() + 20
    while True:
        rows = harness.query(
            "SELECT type, reason, instance, detail FROM auth_events"
            " WHERE device_id = ANY($1) AND reason = ANY($2)",
            ids,
            ["subscription_revoked", "session_ended_by_policy"],
        )
        if len(rows) >= 2 * expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    revoked = [r for r in rows if r["reason"] == "subscription_revoked"]
    ended = [r for r in rows if r["reason"] == "session_ended_by_policy"]
    assert (len(revoked), len(ended)) == (expected, expected)
    assert {r["type"] for r in revoked} == {"subscribe"}
    assert {r["type"] for r in ended} == {"session_end"}
    assert {r["instance"] for r in ended} == {g.instance for g in three}
    for row in revoked:
        detail = json.loads(row["detail"])
        assert detail["filter"] == f"fleets/{fleet}/#" and detail["policy_version"] > 0
        assert detail["statement"] == f"prop-{fleet}/deny-fleet"
