"""Every abuse limit trips with its own reason while a live session keeps publishing.

One gateway with tight limits; a device publishes QoS 1 through it (from a background
thread) for the whole module, and each test checks that it kept going while its limit
tripped. Misbehaving peers come from other loopback addresses (127.0.0.x), so the
per-address limits are visible as such.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.limits import HandshakeSlots
from gateway.mqtt import Connack, Disconnect, Puback, Publish
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from tests.gateway.clients import RawClient
from tests.gateway.conftest import TEST_POLICY, DeviceFactory, Harness
from tests.gateway.live import wait_for

MAX_PACKET = 4096
HANDSHAKE_TIMEOUT = 1.0
FAILURES_PER_MINUTE = 3
WINDOW = 1.0  # refusal-event throttle window


class Publisher(threading.Thread):
    """Publishes QoS 1 and waits for each PUBACK, until stopped or anything goes wrong."""

    def __init__(self, client: RawClient, topic: str) -> None:
        super().__init__(daemon=True)
        self.client, self.topic = client, topic
        self.acks = 0
        self.error: object = None
        self.stopping = threading.Event()

    def run(self) -> None:
        packet_id = 0
        while not self.stopping.is_set():
            packet_id = packet_id % 65535 + 1
            try:
                self.client.send(
                    Publish(topic=self.topic, payload=b"tick", qos=1, packet_id=packet_id)
                )
                reply = self.client.recv(timeout=5)
            except Exception as exc:
                self.error = exc
                return
            if not (isinstance(reply, Puback) and reply.packet_id == packet_id):
                self.error = reply
                return
            self.acks += 1
            time.sleep(0.01)

    def keeps_publishing(self) -> None:
        start = self.acks
        wait_for(lambda: self.acks >= start + 5 or self.error is not None)
        assert self.error is None, self.error


@pytest.fixture
def limited(harness: Harness, make_device: DeviceFactory) -> Iterator[tuple[Gateway, Publisher]]:
    """A gateway with tight limits (its own, so each test starts with fresh buckets), and a
    device publishing through it."""
    gateway = Gateway(
        config=harness.config(
            handshake_timeout=HANDSHAKE_TIMEOUT, connect_timeout=0.5, max_packet_size=MAX_PACKET
        ),
        sink=harness.sink,
        directory=PostgresDirectory(harness.pool),
        host="127.0.0.1",
        port=0,
        policy=TEST_POLICY,
        failed_handshakes_per_minute=FAILURES_PER_MINUTE,
        refusal_event_interval=WINDOW,
    )
    harness.call(gateway.start())
    device = make_device("steady")
    client = RawClient(gateway.port, device, device.chain, version=5)
    assert client.connect(device.device_id).reason_code == 0
    publisher = Publisher(client, f"devices/{device.device_id}/telemetry")
    publisher.start()
    try:
        yield gateway, publisher
        assert publisher.error is None, publisher.error
    finally:
        publisher.stopping.set()
        publisher.join(5)
        client.close()
        harness.call(gateway.close())


def _from(address: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(address, 0))


def _peer(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def test_handshake_and_connect_timeouts(
    harness: Harness, limited: tuple[Gateway, Publisher], make_device: DeviceFactory
) -> None:
    gateway, publisher = limited
    device = make_device("silent")
    mark = harness.mark()
    with (
        _from("127.0.0.2", gateway.port) as mute,  # never says hello
        RawClient(gateway.port, device, device.chain, version=5) as quiet,  # never CONNECTs
    ):
        peer = _peer(mute)
        started = time.monotonic()
        assert mute.recv(1024) == b""
        assert quiet.closed()
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 1
        publisher.keeps_publishing()
    (row,) = harness.wait_events(after=mark, peer_address=peer)
    assert (row["type"], row["reason"]) == ("tls_handshake", "handshake_timeout")
    (row,) = harness.wait_events(after=mark, device_id=device.device_id)
    assert (row["type"], row["reason"]) == ("connect", "connect_timeout")


@pytest.mark.parametrize("version", [4, 5])
def test_packet_too_large(
    harness: Harness,
    limited: tuple[Gateway, Publisher],
    make_device: DeviceFactory,
    version: int,
) -> None:
    gateway, publisher = limited
    device = make_device("bulky")
    mark = harness.mark()
    with RawClient(gateway.port, device, device.chain, version=version) as client:
        connack = client.connect(device.device_id)
        assert isinstance(connack, Connack) and connack.reason_code == 0
        if version == 5:  # advertised, so a compliant client never sends one
            assert connack.properties.maximum_packet_size == MAX_PACKET
        topic = f"devices/{device.device_id}/blob"
        client.send(Publish(topic=topic, payload=b"x" * MAX_PACKET))
        if version == 5:
            assert client.recv() == Disconnect(reason_code=0x95)
        assert client.closed()
        publisher.keeps_publishing()
    rows = harness.wait_events(2, after=mark, device_id=device.device_id)
    assert [(r["type"], r["outcome"], r["reason"]) for r in rows] == [
        ("connect", "allowed", "ok"),
        ("session_end", "denied", "packet_too_large"),
    ]


def test_oversized_connect_is_refused(
    harness: Harness, limited: tuple[Gateway, Publisher], make_device: DeviceFactory
) -> None:
    gateway, publisher = limited
    device = make_device("bigconnect")
    mark = harness.mark()
    with RawClient(gateway.port, device, device.chain, version=4) as client:
        client.send_bytes(b"\x10" + bytes([0xFF, 0xFF, 0x03]) + b"\x00" * 64)  # 64 KiB CONNECT
        assert client.closed()
    publisher.keeps_publishing()
    (row,) = harness.wait_events(after=mark, device_id=device.device_id)
    assert (row["type"], row["reason"]) == ("connect", "packet_too_large")


def _failed_handshake(address: str, port: int, chain: object) -> None:
    """A TLS client without a certificate: the gateway refuses it (no_client_certificate)."""
    context = ssl.create_default_context(cafile=str(chain))
    with (
        _from(address, port) as raw,
        contextlib.suppress(ssl.SSLError, ConnectionError),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(1) == b""


def _refused_at_accept(address: str, port: int) -> str:
    """Connect and see the connection dropped before any TLS byte; the local address."""
    with _from(address, port) as raw:
        peer = _peer(raw)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            raw.sendall(b"\x16\x03\x01\x00\x05hello")
            assert raw.recv(10) == b""
        # At accept, not after the handshake timeout.
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT * 0.8
    return peer


def _summarised(harness: Harness, mark: int, reason: str) -> tuple[int, list[dict[str, object]]]:
    """(events of one failure each, summaries) of ``reason`` since ``mark``."""
    rows = harness.events(mark, reason=reason)
    details = [json.loads(r["detail"]) for r in rows]
    return sum("count" not in d for d in details), [d for d in details if "count" in d]


def test_failed_handshakes_over_budget_are_summarised_and_a_good_device_still_connects(
    harness: Harness,
    limited: tuple[Gateway, Publisher],
    make_device: DeviceFactory,
) -> None:
    gateway, publisher = limited
    chain = harness.pki.chain
    attacker = "127.0.0.5"
    over = 4
    mark = harness.mark()
    for _ in range(FAILURES_PER_MINUTE + over):
        _failed_handshake(attacker, gateway.port, chain)
    # Not refused at accept: a good device behind the same address gets in.
    device = make_device("behind-nat")
    with RawClient(gateway.port, device, device.chain, version=5, source=attacker) as client:
        assert client.connect(device.device_id).reason_code == 0
    publisher.keeps_publishing()
    # Within the budget one event per failure; beyond it summaries (the first at once, the
    # rest when the window closes) whose counts add up exactly.
    wait_for(
        lambda: (
            sum(int(d["count"]) for d in _summarised(harness, mark, "no_client_certificate")[1])  # type: ignore[call-overload]
            == over
        ),
        timeout=WINDOW + 5,
    )
    single, summaries = _summarised(harness, mark, "no_client_certificate")
    assert single == FAILURES_PER_MINUTE
    assert {d["address"] for d in summaries} == {attacker}
    assert len(summaries) <= over
    assert not harness.events(mark, reason="rate_limited")


def test_an_over_budget_address_waits_for_slots_and_is_refused_beyond_its_queue(
    harness: Harness, limited: tuple[Gateway, Publisher]
) -> None:
    gateway, publisher = limited
    gateway.slots = HandshakeSlots(in_flight=1, queue=1)
    attacker = "127.0.0.6"
    mark = harness.mark()
    for _ in range(FAILURES_PER_MINUTE):
        _failed_handshake(attacker, gateway.port, harness.pki.chain)
    with _from(attacker, gateway.port) as holder, _from(attacker, gateway.port) as waiter:
        wait_for(lambda: gateway.slots.waiting(attacker) == 1)
        refused = _refused_at_accept(attacker, gateway.port)  # beyond the queue
        # The holder times out its handshake; the waiter gets the slot, then times out too.
        assert holder.recv(64) == b""
        assert waiter.recv(64) == b""
    publisher.keeps_publishing()
    (row,) = harness.wait_events(timeout=WINDOW + 5, after=mark, reason="rate_limited")
    detail = json.loads(row["detail"])
    assert (row["peer_address"], detail["count"]) == (refused, 1)
    assert (detail["handshakes_in_flight"], detail["handshake_queue"]) == (1, 1)
    wait_for(lambda: len(gateway.slots) == 0)


def test_too_many_connections(
    harness: Harness, limited: tuple[Gateway, Publisher], make_device: DeviceFactory
) -> None:
    gateway, publisher = limited
    wait_for(lambda: len(gateway.connections) == 1)  # just the publisher
    gateway.max_connections = 3
    mark = harness.mark()
    try:
        with _from("127.0.0.4", gateway.port), _from("127.0.0.4", gateway.port):
            wait_for(lambda: len(gateway.connections) == 3)
            refused = [_refused_at_accept("127.0.0.1", gateway.port) for _ in range(3)]
            publisher.keeps_publishing()
        wait_for(lambda: len(gateway.connections) == 1)
        device = make_device("room")
        with RawClient(gateway.port, device, device.chain, version=5) as client:
            assert client.connect(device.device_id).reason_code == 0
    finally:
        gateway.max_connections = 10_000
    rows = harness.wait_events(2, timeout=WINDOW + 5, after=mark, reason="too_many_connections")
    assert [(r["type"], r["outcome"], r["peer_address"]) for r in rows] == [
        ("tls_handshake", "denied", refused[0]),
        ("tls_handshake", "denied", refused[-1]),
    ]
    assert [json.loads(r["detail"])["count"] for r in rows] == [1, 2]
    assert json.loads(rows[0]["detail"])["max_connections"] == 3
    publisher.keeps_publishing()
