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


def test_failed_handshakes_are_rate_limited_per_address(
    harness: Harness,
    limited: tuple[Gateway, Publisher],
    make_device: DeviceFactory,
) -> None:
    gateway, publisher = limited
    chain = harness.pki.chain
    attacker = "127.0.0.5"
    mark = harness.mark()
    for _ in range(FAILURES_PER_MINUTE):
        _failed_handshake(attacker, gateway.port, chain)
    refused = [_refused_at_accept(attacker, gateway.port) for _ in range(4)]
    # Another address is untouched: a device connects, the live session keeps publishing.
    device = make_device("neighbour")
    with RawClient(gateway.port, device, device.chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
    publisher.keeps_publishing()
    # One event for the first refusal at once, one summary for the rest when the window
    # closes: a flood of refusals cannot flood the audit log.
    rows = harness.wait_events(2, timeout=WINDOW + 5, after=mark, reason="rate_limited")
    assert [(r["type"], r["outcome"], r["peer_address"]) for r in rows] == [
        ("tls_handshake", "denied", refused[0]),
        ("tls_handshake", "denied", refused[-1]),
    ]
    details = [json.loads(r["detail"]) for r in rows]
    assert [d["count"] for d in details] == [1, 3]
    assert {d["address"] for d in details} == {attacker}
    failures = harness.events(mark, reason="no_client_certificate")
    assert len(failures) == FAILURES_PER_MINUTE
    assert {str(r["peer_address"]).partition(":")[0] for r in failures} == {attacker}


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
