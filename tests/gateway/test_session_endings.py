"""Issue 18: what the broker sees when a session ends other than by the device's DISCONNECT.

The decision (docs/mqtt-behaviour.md, "What the broker sees when a session ends", and
`gateway.bridge`): a DISCONNECT reaches the broker only when the device sent one or the
gateway drains for a shutdown; a takeover is left to the broker's own takeover; revocation,
expiry and a tripped limit are drops, so the device's will fires, after everything the
device sent before. Observed directly on Mosquitto, never through
the gateway. Each device subscribes to its own topics, so the broker is echoing to the
gateway when the session ends (the case that used to reset the broker connection).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from gateway.mqtt import encode
from gateway.mqtt.packets import (
    Connect,
    Disconnect,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from gateway.mqtt.properties import Properties, PropertyId
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.live import Live, live_gateway, revoke_certificate
from tests.gateway.witness import Observer, will_of

BURST = 10


@pytest.fixture(scope="module")
def live(harness: Harness) -> Iterator[Live]:
    with live_gateway(harness) as live:
        yield live


@pytest.fixture
def observer(harness: Harness, make_device: DeviceFactory) -> Iterator[tuple[Device, Observer]]:
    device = make_device("ending")
    with Observer(harness.mosquitto_port, device.device_id) as observer:
        yield device, observer


def _session(port: int, device: Device, version: int, **connect: object) -> RawClient:
    """Connected with a will (unless given), subscribed to ``devices/<id>/echo/#``."""
    client = RawClient(port, device, device.chain, version=version)
    connect.setdefault("will", will_of(device.device_id))
    assert client.connect(device.device_id, **connect).reason_code == 0
    mine = Subscription(topic_filter=f"devices/{device.device_id}/echo/#", qos=1)
    client.send(Subscribe(packet_id=1, subscriptions=(mine,)))
    suback = client.recv()
    assert isinstance(suback, Suback) and suback.reason_codes == (1,), suback
    return client


def _burst(device: Device, version: int, qos: int = 0) -> bytes:
    topic = f"devices/{device.device_id}/echo/burst"
    return b"".join(
        encode(
            Publish(topic=topic, payload=b"%d" % i, qos=qos, packet_id=i + 1 if qos else None),
            version=version,
        )
        for i in range(BURST)
    )


def _forwarded(observer: Observer, device: Device) -> bool:
    """Whether the broker got the whole burst, in order."""
    topic = f"devices/{device.device_id}/echo/burst"
    return observer.wait(lambda: len(observer.messages(topic)) >= BURST) and observer.messages(
        topic
    ) == [b"%d" % i for i in range(BURST)]


def _ended(client: RawClient) -> int | None:
    """Read (echoes, acks) until the gateway closes; the DISCONNECT reason code it sent."""
    code = None
    while (packet := client.recv()) is not None:
        if isinstance(packet, Disconnect):
            code = packet.reason_code
    return code


def _burst_then_will(observer: Observer, device: Device) -> None:
    """The broker got the whole burst, then published the will, once."""
    assert observer.wait(lambda: observer.wills() == 1), "the will did not fire"
    observer.settle()
    assert _forwarded(observer, device)
    assert observer.wills() == 1
    assert observer.topics()[-1] == will_of(device.device_id).topic  # after the burst


@pytest.mark.parametrize("version", [4, 5])
def test_takeover_is_the_brokers_own(
    harness: Harness, observer: tuple[Device, Observer], version: int
) -> None:
    # The new CONNECT takes the old connection over at the broker, which decides as it
    # would without the gateway: Mosquitto publishes the will of a clean session it ends
    # (MQTT-3.1.4-3 on v5, and on 3.1.1 too), before the new session is live.
    device, seen = observer
    with _session(harness.port, device, version) as old:
        old.send_bytes(_burst(device, version))
        assert _forwarded(seen, device)
        with _session(harness.port, device, version) as new:
            assert _ended(old) == (0x8E if version == 5 else None)
            assert seen.wait(lambda: seen.wills() == 1), "the will did not fire"
            new.send(Publish(topic=f"devices/{device.device_id}/after", payload=b"new"))
            new.send(Disconnect())
            assert _ended(new) is None
    seen.settle()
    assert seen.wills() == 1
    will = will_of(device.device_id).topic
    assert seen.topics()[-2:] == [will, f"devices/{device.device_id}/after"]


def test_takeover_of_a_v5_session_with_a_will_delay_keeps_the_will(
    harness: Harness, observer: tuple[Device, Observer]
) -> None:
    # The MQTT 5 way to survive a takeover without a will: a session that outlives the
    # connection (and a Will Delay Interval), resumed by the new connection.
    device, seen = observer
    delay = 1
    will = Will(
        topic=will_of(device.device_id).topic,
        payload=b"vanished",
        qos=1,
        properties=Properties.of((PropertyId.WILL_DELAY_INTERVAL, delay)),
    )
    session = Properties.of((PropertyId.SESSION_EXPIRY_INTERVAL, 60))
    with _session(harness.port, device, 5, will=will, properties=session) as old:
        old.send_bytes(_burst(device, 5))
        assert _forwarded(seen, device)
        with _session(
            harness.port, device, 5, will=will, properties=session, clean_start=False
        ) as new:
            assert _ended(old) == 0x8E
            time.sleep(delay + 0.5)  # past the will's delay
            new.send(Disconnect())  # reason 0: the broker deletes this connection's will
            assert _ended(new) is None
    seen.settle()
    assert seen.wills() == 0


@pytest.mark.parametrize("version", [4, 5])
def test_revocation_is_a_drop(
    harness: Harness, live: Live, observer: tuple[Device, Observer], version: int
) -> None:
    device, seen = observer
    with _session(live.port, device, version) as client:
        client.send_bytes(_burst(device, version))
        assert _forwarded(seen, device)
        revoke_certificate(harness, device)
        assert _ended(client) == (0x98 if version == 5 else None)
    _burst_then_will(seen, device)


def test_expiry_is_a_drop(
    harness: Harness, make_device: DeviceFactory, observer: tuple[Device, Observer]
) -> None:
    device, seen = observer
    # Re-issued for the same device id, valid for two more seconds.
    device = make_device(
        device_id=device.device_id, not_after=datetime.now(UTC) + timedelta(seconds=2)
    )
    with _session(harness.port, device, 5) as client:
        client.send_bytes(_burst(device, 5))
        assert _ended(client) == 0x87  # within the RawClient's 5 s
    _burst_then_will(seen, device)


@pytest.mark.parametrize("version", [4, 5])
def test_a_tripped_limit_is_a_drop_after_what_came_before(
    harness: Harness, observer: tuple[Device, Observer], version: int
) -> None:
    device, seen = observer
    if version == 5:  # too large: over the gateway's 64 KiB, in the same write as the burst
        bad = encode(
            Publish(topic=f"devices/{device.device_id}/x", payload=bytes(70_000)), version=5
        )
    else:  # a protocol error: a second CONNECT
        bad = encode(Connect(protocol_level=4, client_id=device.device_id), version=4)
    with _session(harness.port, device, version) as client:
        client.send_bytes(_burst(device, version) + bad)
        assert _ended(client) == (0x95 if version == 5 else None)
    _burst_then_will(seen, device)


def test_a_v5_disconnect_with_will_message_is_forwarded(
    harness: Harness, observer: tuple[Device, Observer]
) -> None:
    device, seen = observer
    with _session(harness.port, device, 5) as client:
        client.send_bytes(_burst(device, 5) + encode(Disconnect(reason_code=0x04), version=5))
        assert _ended(client) is None
    _burst_then_will(seen, device)


def test_drain_says_goodbye_for_the_device(
    harness: Harness, observer: tuple[Device, Observer]
) -> None:
    # What SIGTERM runs (gateway.serve): the device did nothing wrong and comes back.
    device, seen = observer
    gateway = harness.start_gateway()
    try:
        with _session(gateway.port, device, 5) as client:
            client.send_bytes(_burst(device, 5, qos=1))
            assert _forwarded(seen, device)
            harness.call(gateway.drain(within=5))
            assert _ended(client) == 0x8B
    finally:
        harness.call(gateway.close())
    seen.settle()
    assert seen.wills() == 0
