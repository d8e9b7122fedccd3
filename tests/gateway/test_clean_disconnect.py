"""Issue 18: a device's last write (a burst of PUBLISHes and its DISCONNECT) reaches the
broker whole, in order, while the broker is echoing those PUBLISHes back to it.

Through the real ``devicegate serve gateway --workers 2`` to a private Mosquitto; an
observer subscribed directly on Mosquitto counts the messages and the wills. The device is
subscribed to its own topics, so the gateway's upstream socket holds unread echoes when
the session ends: closing it then sends a RST, which destroyed the broker's unread input.

The device reads until the gateway closes (as a careful client does): a device that closes
with unread input resets its own connection, and loses its last packets even straight to
Mosquitto, which is not what these tests are about.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.mqtt import encode
from gateway.mqtt.packets import (
    Connect,
    Disconnect,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
)
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory
from tests.gateway.served import Served, serve_gateway
from tests.gateway.witness import Broker, Observer, logged_mosquitto, will_of

ROUNDS = 20
BURST = 20


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with logged_mosquitto(tmp_path_factory.mktemp("broker")) as broker:
        yield broker


@pytest.fixture(scope="module")
def served(
    pki: Pki, database_url: str, broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    directory: Path = tmp_path_factory.mktemp("served")
    with serve_gateway(
        pki=pki,
        database_url=database_url,
        upstream_port=broker.port,
        directory=directory,
        name="clean",
    ) as served:
        yield served


def _session(port: int, device: Device, version: int, qos: int) -> RawClient:
    """A device connected with a will and subscribed to its own burst topics."""
    client = RawClient(port, device, device.chain, version=version)
    assert client.connect(device.device_id, will=will_of(device.device_id)).reason_code == 0
    mine = Subscription(topic_filter=f"devices/{device.device_id}/burst/#", qos=qos)
    client.send(Subscribe(packet_id=1, subscriptions=(mine,)))
    suback = client.recv()
    assert isinstance(suback, Suback) and suback.reason_codes == (qos,), suback
    return client


def _burst(topic: str, version: int, qos: int) -> bytes:
    return b"".join(
        encode(
            Publish(topic=topic, payload=b"%d" % i, qos=qos, packet_id=i + 1 if qos else None),
            version=version,
        )
        for i in range(BURST)
    )


def _last_write(client: RawClient, topic: str, qos: int) -> bytes:
    """What the device's last write carries before its DISCONNECT (or its drop).

    QoS 2 messages reach subscribers when the broker gets their PUBREL, so the PUBLISHes
    go first and the last write carries the PUBRELs: that write then triggers the echoes,
    exactly like a QoS 0 or 1 burst.
    """
    burst = _burst(topic, client.version, qos)
    if qos < 2:
        return burst
    client.send_bytes(burst)
    for i in range(BURST):
        pubrec = client.recv()
        assert isinstance(pubrec, Pubrec) and pubrec.packet_id == i + 1, pubrec
    return b"".join(encode(Pubrel(packet_id=i + 1), version=client.version) for i in range(BURST))


@pytest.mark.parametrize("version", [4, 5], ids=["v3.1.1", "v5"])
@pytest.mark.parametrize("qos", [0, 1, 2], ids=["qos0", "qos1", "qos2"])
def test_burst_and_disconnect_in_one_write_lose_nothing(
    served: Served, broker: Broker, make_device: DeviceFactory, version: int, qos: int
) -> None:
    device = make_device("burst")
    expected: dict[str, list[bytes]] = {}
    with Observer(broker.port, device.device_id) as observer:
        for round_ in range(ROUNDS):
            topic = f"devices/{device.device_id}/burst/{round_}"
            expected[topic] = [b"%d" % i for i in range(BURST)]
            with _session(served.port, device, version, qos) as client:
                last = _last_write(client, topic, qos)
                client.send_bytes(last + encode(Disconnect(), version=version))  # one write
                assert client.closed(), "the gateway did not close after DISCONNECT"
        everything = ROUNDS * BURST
        observer.wait(lambda: len(observer.messages()) >= everything)
        observer.settle()
        got = {topic: observer.messages(topic) for topic in expected}
        lost = sum(len(expected[t]) - len(got[t]) for t in expected)
        assert lost == 0, f"{lost} of {everything} PUBLISHes lost"
        assert got == expected  # in order, each exactly once
        assert observer.wills() == 0, "a will fired after a clean DISCONNECT"
    # The broker read each DISCONNECT (the last one is the observer's settling probe).
    assert broker.endings(device.device_id) == ["disconnected"] * (ROUNDS + 1)


@pytest.mark.parametrize("version", [4, 5], ids=["v3.1.1", "v5"])
def test_a_drop_after_a_burst_delivers_the_burst_and_fires_the_will(
    served: Served, broker: Broker, make_device: DeviceFactory, version: int
) -> None:
    device = make_device("drop")
    rounds = 5
    with Observer(broker.port, device.device_id) as observer:
        for round_ in range(rounds):
            topic = f"devices/{device.device_id}/burst/{round_}"
            with _session(served.port, device, version, 1) as client:
                client.send_bytes(_last_write(client, topic, 1))
            # Closed without DISCONNECT (nor a TLS close_notify): the device vanished.
            assert observer.wait(lambda n=round_ + 1: observer.wills() == n), "no will"
            assert observer.messages(topic) == [b"%d" % i for i in range(BURST)]
        observer.settle()
        assert observer.wills() == rounds
    assert broker.endings(device.device_id) == ["closed its connection"] * rounds + ["disconnected"]


@pytest.mark.parametrize("goodbye", [True, False], ids=["disconnect", "drop"])
def test_a_session_pipelined_with_its_connect_outlives_the_device(
    served: Served, broker: Broker, make_device: DeviceFactory, goodbye: bool
) -> None:
    """The whole session in one write (CONNECT, SUBSCRIBE to its own topics, a burst,
    perhaps DISCONNECT), then the socket closes unread: the gateway authorises the CONNECT
    after the device has gone and still forwards the rest, as a broker reading the same
    bytes would; without the DISCONNECT, the will fires after the burst."""
    device = make_device("pipelined")
    rounds = 5
    version = 5
    mine = Subscription(topic_filter=f"devices/{device.device_id}/burst/#", qos=1)
    hello = encode(
        Connect(protocol_level=version, client_id=device.device_id, will=will_of(device.device_id)),
        version=version,
    ) + encode(Subscribe(packet_id=1, subscriptions=(mine,)), version=version)
    bye = encode(Disconnect(), version=version) if goodbye else b""
    with Observer(broker.port, device.device_id) as observer:
        for round_ in range(rounds):
            topic = f"devices/{device.device_id}/burst/{round_}"
            client = RawClient(served.port, device, device.chain, version=version)
            client.send_bytes(hello + _burst(topic, version, 1) + bye)
            client.close()
            assert observer.wait(lambda t=topic: len(observer.messages(t)) >= BURST)
            assert observer.messages(topic) == [b"%d" % i for i in range(BURST)]
            if not goodbye:
                assert observer.wait(lambda n=round_ + 1: observer.wills() == n), "no will"
        observer.settle()
        assert observer.wills() == (0 if goodbye else rounds)
    ending = "disconnected" if goodbye else "closed its connection"
    assert broker.endings(device.device_id) == [ending] * rounds + ["disconnected"]
