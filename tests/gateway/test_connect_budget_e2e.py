"""The per-device connect budget through a real gateway, real mTLS and a real Mosquitto
whose log says which connections reached it: a certificate looping from a second address
gets its burst, then CONNACK 0x9F (3 on 3.1.1), never reaches the broker, never takes over
the device's live session, and its refusals are two audit rows; an honest device
reconnecting with backoff is never refused."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

import pytest

from gateway.limits import ConnectLimits
from gateway.mqtt import Disconnect, Puback, Publish
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from gateway.upstream import UpstreamTarget
from tests.gateway.clients import RawClient
from tests.gateway.conftest import TEST_POLICY, Device, DeviceFactory, Harness
from tests.gateway.live import wait_for
from tests.gateway.witness import Broker, logged_mosquitto

BURST = 4
LOOP = 30  # refused attempts after the burst
WINDOW = 30.0  # one refusal event per device per window; the rest at close


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with logged_mosquitto(tmp_path_factory.mktemp("budget-broker")) as broker:
        yield broker


def _gateway(harness: Harness, broker: Broker, limits: ConnectLimits) -> Gateway:
    gateway = Gateway(
        config=harness.config(upstream=UpstreamTarget("127.0.0.1", broker.port), connects=limits),
        sink=harness.sink,
        directory=PostgresDirectory(harness.pool),
        host="127.0.0.1",
        port=0,
        policy=TEST_POLICY,
        refusal_event_interval=WINDOW,
    )
    harness.call(gateway.start())
    return gateway


def _broker_connections(broker: Broker, client_id: str) -> int:
    """How many connections of ``client_id`` Mosquitto logged as connected."""
    return sum(f" as {client_id} (" in line for line in broker.log.read_text().splitlines())


def _connect(port: int, device: Device, version: int, source: str) -> tuple[RawClient, int]:
    client = RawClient(port, device, device.chain, version=version, source=source)
    return client, client.connect(device.device_id).reason_code


def test_a_looping_certificate_gets_its_burst_then_is_refused_without_cutting_the_live_one(
    harness: Harness, broker: Broker, make_device: DeviceFactory
) -> None:
    gateway = _gateway(harness, broker, ConnectLimits(per_minute=1, burst=BURST))
    device = make_device("looped")
    mark = harness.mark()
    try:
        # The copy on a second host: admitted BURST - 1 times (each a clean session).
        for _ in range(BURST - 1):
            client, code = _connect(gateway.port, device, 5, "127.0.0.2")
            assert code == 0
            client.send(Disconnect())
            assert client.closed()
            client.close()
        # The device itself: the last token, a live session.
        live, code = _connect(gateway.port, device, 5, "127.0.0.1")
        assert code == 0
        wait_for(lambda: _broker_connections(broker, device.device_id) == BURST)
        # The copy loops: refused at once, MQTT 5 with 0x9F, 3.1.1 with 3.
        for i in range(LOOP):
            version = 5 if i % 2 else 4
            client, code = _connect(gateway.port, device, version, "127.0.0.2")
            assert code == (0x9F if version == 5 else 3), (i, code)
            assert client.closed()
            client.close()
        # The live session was not taken over (no DISCONNECT 0x8E, not closed) and works.
        with pytest.raises(TimeoutError):
            live.recv(timeout=0.3)
        topic = f"devices/{device.device_id}/telemetry"
        live.send(Publish(topic=topic, payload=b"still here", qos=1, packet_id=1))
        assert isinstance(live.recv(), Puback)
        live.send(Disconnect())
        assert live.closed()
        live.close()
        # No refused attempt reached the broker.
        time.sleep(0.2)
        assert _broker_connections(broker, device.device_id) == BURST
    finally:
        harness.call(gateway.close())  # records the window's summary
    rows = harness.events(mark, device_id=device.device_id)
    by_reason: dict[str, list[int]] = {}
    for row in rows:
        count = json.loads(row["detail"]).get("count", 1)
        by_reason.setdefault(f"{row['type']}/{row['reason']}", []).append(count)
    refused = by_reason.pop("connect/connect_rate_exceeded")
    # Exactly LOOP refusals, in two rows: the first alone, the rest in the window's summary.
    assert refused == [1, LOOP - 1], refused
    # Besides them: each admitted session's connect and end, and no takeover at all.
    assert by_reason == {
        "connect/ok": [1] * BURST,
        "session_end/client_disconnected": [1] * BURST,
    }, by_reason


def test_an_honest_device_reconnecting_with_backoff_is_never_refused(
    harness: Harness, broker: Broker, make_device: DeviceFactory
) -> None:
    """8 drops and reconnects with jittered exponential backoff (a storm device's pattern,
    compressed in time), under the default budget."""
    gateway = _gateway(harness, broker, ConnectLimits())
    device = make_device("honest")
    mark = harness.mark()
    rng = random.Random(3)
    delay = 0.02
    try:
        for _ in range(8):
            client, code = _connect(gateway.port, device, 5, "127.0.0.1")
            assert code == 0
            client.close()  # the link drops
            time.sleep(delay * rng.uniform(0.5, 1.5))
            delay *= 2
    finally:
        harness.call(gateway.close())
    assert not harness.events(mark, reason="connect_rate_exceeded")
    assert len(harness.events(mark, device_id=device.device_id, reason="ok")) == 8
