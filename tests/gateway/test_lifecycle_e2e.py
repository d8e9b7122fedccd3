"""Connection lifecycle: fail-closed lookups, limits, shutdown, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as paho
import pytest

from gateway.actions import Action
from gateway.bridge import DeviceConnection
from gateway.connection import Session
from gateway.mqtt import Connack, Connect, Disconnect, Pingreq, Suback, Subscribe, Subscription
from gateway.server import Gateway
from schemas.events import Reason
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness


class BrokenDirectory:
    async def check(self, *, device_id: str, fleet: str, serial: str) -> Reason:
        raise ConnectionError("registry unreachable")


@pytest.mark.parametrize(("version", "code"), [(4, 0x03), (5, 0x88)])
def test_registry_unreachable_fails_closed(
    harness: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    gateway = harness.start_gateway(directory=BrokenDirectory())
    try:
        device = make_device("blind")
        mark = harness.mark()
        with RawClient(gateway.port, device, device.chain, version=version) as client:
            assert client.connect(device.device_id) == Connack(reason_code=code)
        (row,) = harness.wait_events(after=mark, type="connect")
        assert row["reason"] == "revocation_state_stale"
    finally:
        harness.call(gateway.close())


def test_max_connections(harness: Harness, make_device: DeviceFactory) -> None:
    gateway = harness.start_gateway(max_connections=1)
    try:
        device = make_device("limit")
        with RawClient(gateway.port, device, device.chain) as first:
            assert first.connect(device.device_id).reason_code == 0
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as second:
                second.sendall(b"\x16\x03\x01\x00\x05hello")
                with contextlib.suppress(ConnectionResetError):  # aborted before any TLS work
                    assert second.recv(10) == b""
    finally:
        harness.call(gateway.close())


def test_shutdown_disconnects_sessions(harness: Harness, make_device: DeviceFactory) -> None:
    gateway = harness.start_gateway()
    device = make_device("bye")
    mark = harness.mark()
    with RawClient(gateway.port, device, device.chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
        harness.call(gateway.close())
        assert client.recv() == Disconnect(reason_code=0x8B)
        assert client.closed()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=1).close()
    rows = harness.wait_events(2, after=mark, device_id=device.device_id)
    assert [(r["type"], r["reason"]) for r in rows] == [
        ("connect", "ok"),
        ("session_end", "server_shutting_down"),
    ]


async def _drain_with_a_late_connection(gateway: Gateway, accepted: socket.socket) -> int:
    """Drain while a connection is accepted whose ``connection_made`` comes after the
    drain's first step, as the listener's accept schedules it (``call_soon``) when a
    worker's stop and a device's connect are handled in one loop iteration; the number of
    connections left once the drain returned."""
    loop = asyncio.get_running_loop()
    drain = asyncio.ensure_future(gateway.drain(within=5))  # its first step runs first
    await loop.connect_accepted_socket(lambda: DeviceConnection(gateway), accepted)
    await drain
    return len(gateway.connections)


def test_a_connection_made_as_the_drain_begins_is_ended(
    harness: Harness, make_device: DeviceFactory
) -> None:
    # A take-over's old worker admitted such a device after its drain began, and held it
    # until the drain timed out (the device's reconnection went to the old instance).
    gateway = harness.start_gateway()
    device = make_device("late")
    with socket.create_server(("127.0.0.1", 0)) as listener, ThreadPoolExecutor(1) as pool:
        dialing = pool.submit(RawClient, listener.getsockname()[1], device, device.chain)
        accepted, _ = listener.accept()
        left = harness.call(_drain_with_a_late_connection(gateway, accepted))
        try:
            client = dialing.result(10)
        except OSError:  # ended before its TLS handshake
            client = None
        if client is not None:  # the gateway going away went on with it
            with client:
                client.send(Connect(protocol_level=4, client_id=device.device_id))
                answer = client.recv()
            pytest.fail(f"a draining gateway took a new connection; its CONNECT got {answer}")
    assert left == 0


def test_slow_device_pauses_the_broker_side(harness: Harness, make_device: DeviceFactory) -> None:
    """A device that does not read makes the gateway stop reading the broker, and resume."""
    device = make_device("slow")
    topic = f"devices/{device.device_id}/t"
    with RawClient(harness.port, device, device.chain) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic),)))
        assert isinstance(client.recv(), Suback)
        (connection,) = [
            c
            for c in harness.gateway.connections
            if c.session and c.session.identity.device_id == device.device_id
        ]
        publisher = paho.Client(paho.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", harness.mosquitto_port)
        publisher.loop_start()
        try:
            payload = b"x" * 32_000
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for _ in range(20):
                    publisher.publish(topic, payload)
                if connection.upstream is not None and not connection.upstream.is_reading():
                    break
                time.sleep(0.02)
            assert connection.upstream is not None
            assert not connection.upstream.is_reading(), "the broker side was never paused"
            # Reading drains the device side; the broker side resumes.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not connection.upstream.is_reading():
                client.sock.settimeout(1)
                client.sock.recv(1 << 20)
            assert connection.upstream.is_reading()
        finally:
            publisher.loop_stop()
            publisher.disconnect()


def test_internal_error_fails_closed(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("oops")
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain) as client:
        assert client.connect(device.device_id).reason_code == 0
        (connection,) = [
            c
            for c in harness.gateway.connections
            if c.session and c.session.identity.device_id == device.device_id
        ]

        class Broken(Session):
            __slots__ = ()

            def receive_device(self, data: bytes) -> list[Action]:
                raise RuntimeError("simulated bug")

        assert connection.session is not None
        connection.session.__class__ = Broken  # Session has slots: no per-instance patching
        client.send(Pingreq())
        assert client.closed()
    rows = harness.wait_events(2, after=mark, device_id=device.device_id)
    assert [(r["type"], r["reason"]) for r in rows] == [
        ("connect", "ok"),
        ("session_end", "protocol_error"),
    ]


@pytest.mark.parametrize("version", [4, 5])
def test_revoke_ends_live_sessions(
    harness: Harness, make_device: DeviceFactory, version: int
) -> None:
    device, bystander = make_device("doomed"), make_device("safe")
    mark = harness.mark()
    with (
        RawClient(harness.port, device, device.chain, version=version) as client,
        RawClient(harness.port, bystander, bystander.chain, version=version) as other,
    ):
        assert client.connect(device.device_id).reason_code == 0
        assert other.connect(bystander.device_id).reason_code == 0

        async def revoke() -> int:
            return harness.gateway.revoke(
                device.device_id, reason=Reason.CERTIFICATE_REVOKED, serial=device.serial
            )

        assert harness.call(revoke()) == 1
        if version == 5:
            assert client.recv() == Disconnect(reason_code=0x98)
        assert client.closed()
        other.send(Pingreq())
        assert other.recv() is not None  # unaffected
    rows = harness.wait_events(2, after=mark, device_id=device.device_id)
    assert [(r["type"], r["outcome"], r["reason"]) for r in rows] == [
        ("connect", "allowed", "ok"),
        ("session_revoked", "denied", "certificate_revoked"),
    ]
