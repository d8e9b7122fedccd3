"""Live sessions: one per device (takeover), ended at the certificate's notAfter, and ended
from outside with the right record in every state (the sans-IO `Session.cut`)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from gateway.actions import (
    Action,
    Admit,
    CheckDevice,
    Close,
    DialUpstream,
    Record,
    ToDevice,
    ToUpstream,
)
from gateway.audit import EventContext
from gateway.connection import Session, State
from gateway.identity import DeviceIdentity
from gateway.mqtt import (
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    Publish,
    decode,
    encode,
)
from gateway.policy import compile_for
from schemas.events import EventType, Outcome, Reason
from schemas.policy import FleetPolicy
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import DeviceFactory, Harness
from tests.gateway.live import Live, live_gateway

# --- end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(harness: Harness) -> Iterator[Live]:
    with live_gateway(harness) as live:
        yield live


@pytest.mark.parametrize("version", [4, 5])
def test_second_connection_takes_over(
    harness: Harness, live: Live, make_device: DeviceFactory, version: int
) -> None:
    device = make_device("twin")
    mark = harness.mark()
    with RawClient(live.port, device, device.chain, version=version) as first:
        assert first.connect(device.device_id).reason_code == 0
        with RawClient(live.port, device, device.chain, version=version) as second:
            assert second.connect(device.device_id).reason_code == 0
            if version == 5:
                assert first.recv() == Disconnect(reason_code=0x8E)
            assert first.closed()
            second.send(Pingreq())
            assert second.recv() == Pingresp()  # the new session is the live one
            first_port, second_port = first.sock.getsockname()[1], second.sock.getsockname()[1]
            rows = harness.wait_events(3, after=mark, device_id=device.device_id)
    decisions = [(r["type"], r["outcome"], r["reason"], r["peer_address"]) for r in rows[:3]]
    # The old session ends before the new CONNECT reaches the broker, so before the new
    # session's connect event (recorded once the broker has accepted it).
    assert decisions == [
        ("connect", "allowed", "ok", f"127.0.0.1:{first_port}"),
        ("session_end", "allowed", "session_taken_over", f"127.0.0.1:{first_port}"),
        ("connect", "allowed", "ok", f"127.0.0.1:{second_port}"),
    ]


def test_session_ends_when_its_certificate_expires(
    harness: Harness, live: Live, make_device: DeviceFactory
) -> None:
    """notAfter = now + 3 s: v5 gets DISCONNECT 0x87 (not authorized) at notAfter, 3.1.1 a
    close; both record session_end / certificate_expired; the certificate then fails TLS."""
    soon = datetime.now(UTC) + timedelta(seconds=3)
    devices = {v: make_device(f"expiring{v}", not_after=soon) for v in (4, 5)}
    not_after = x509.load_pem_x509_certificate(devices[5].cert.read_bytes()).not_valid_after_utc
    mark = harness.mark()
    with (
        RawClient(live.port, devices[4], devices[4].chain, version=4) as v4,
        RawClient(live.port, devices[5], devices[5].chain, version=5) as v5,
    ):
        assert v4.connect(devices[4].device_id).reason_code == 0
        assert v5.connect(devices[5].device_id).reason_code == 0
        assert v5.recv(timeout=6) == Disconnect(reason_code=0x87)
        ended = datetime.now(UTC)
        assert v4.closed(timeout=2)
    assert not_after - timedelta(milliseconds=50) <= ended < not_after + timedelta(seconds=1)
    for device in devices.values():
        rows = harness.wait_events(2, after=mark, device_id=device.device_id)
        assert [(r["type"], r["outcome"], r["reason"]) for r in rows] == [
            ("connect", "allowed", "ok"),
            ("session_end", "denied", "certificate_expired"),
        ]
    # Expired now: refused at the handshake (verify code 10), like any expired certificate.
    mark = harness.mark()
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as raw:
        peer = f"127.0.0.1:{raw.getsockname()[1]}"
        context = client_context(devices[4], devices[4].chain)
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)
        except (ssl.SSLError, ConnectionError):
            pass
    (row,) = harness.wait_events(after=mark, peer_address=peer)
    assert (row["type"], row["reason"]) == ("tls_handshake", "certificate_expired")


def test_revoked_before_its_connect_is_refused_and_recorded(
    harness: Harness, live: Live, make_device: DeviceFactory
) -> None:
    """A revocation that lands between the handshake and the CONNECT: recorded as a refusal."""
    device = make_device("early")
    mark = harness.mark()
    with RawClient(live.port, device, device.chain, version=5) as client:
        deadline = time.monotonic() + 5
        while not live.gateway.sessions.of_device(device.device_id):
            assert time.monotonic() < deadline
            time.sleep(0.01)

        async def revoke() -> int:
            return live.gateway.revoke(device.device_id, reason=Reason.DEVICE_DISABLED)

        assert harness.call(revoke()) == 1
        assert client.closed()
    (row,) = harness.wait_events(after=mark, device_id=device.device_id)
    assert (row["type"], row["outcome"], row["reason"]) == ("connect", "denied", "device_disabled")


# --- the sans-IO session ---------------------------------------------------------------

ID = DeviceIdentity(device_id="d1", fleet="plant", serial="abc", fingerprint="00" * 32)


def _session(max_packet_size: int = 4096) -> Session:
    return Session(
        identity=ID,
        policy=compile_for(FleetPolicy(), ID),
        context=EventContext(instance="t", peer_address="1.2.3.4:5", identity=ID),
        max_packet_size=max_packet_size,
    )


def _to_device(actions: list[Action], version: int) -> list[Any]:
    data = b"".join(bytes(a.data) for a in actions if isinstance(a, ToDevice))
    packets = []
    while data:
        packet, used = decode(data, version=version)  # type: ignore[misc]
        packets.append(packet)
        data = data[used:]
    return packets


def _records(actions: list[Action]) -> list[Any]:
    return [a.event for a in actions if isinstance(a, Record)]


def _until_connack(session: Session, version: int, props: Properties | None = None) -> Admit:
    connect = Connect(protocol_level=version, client_id="d1")
    assert [type(a) for a in session.receive_device(encode(connect, version=version))] == [
        CheckDevice
    ]
    assert [type(a) for a in session.device_checked(Reason.OK)] == [DialUpstream]
    connack = Connack(reason_code=0, properties=props or Properties())
    (admit,) = session.receive_upstream(encode(connack, version=version))
    assert isinstance(admit, Admit)
    return admit


@pytest.mark.parametrize(
    ("reason", "revoked", "code", "type_"),
    [
        (Reason.CERTIFICATE_REVOKED, True, 0x98, EventType.SESSION_REVOKED),
        (Reason.CERTIFICATE_SUPERSEDED, True, 0x98, EventType.SESSION_SUPERSEDED),
        (Reason.DEVICE_DISABLED, True, 0x98, EventType.SESSION_REVOKED),
        (Reason.DEVICE_REVOKED, True, 0x98, EventType.SESSION_REVOKED),
        (Reason.CERTIFICATE_EXPIRED, False, 0x87, EventType.SESSION_END),
        (Reason.SESSION_TAKEN_OVER, False, 0x8E, EventType.SESSION_END),
        (Reason.SERVER_SHUTTING_DOWN, False, 0x8B, EventType.SESSION_END),
    ],
)
@pytest.mark.parametrize("version", [4, 5])
def test_cut_a_live_session(
    reason: Reason, revoked: bool, code: int, type_: EventType, version: int
) -> None:
    session = _session()
    _until_connack(session, version)
    session.admitted()
    actions = session.cut(reason, revoked=revoked)
    assert _to_device(actions, version) == ([Disconnect(reason_code=code)] if version == 5 else [])
    (event,) = _records(actions)
    assert (event.type, event.reason) == (type_, reason)
    normal = reason in (
        Reason.SESSION_TAKEN_OVER,
        Reason.SERVER_SHUTTING_DOWN,
        Reason.CERTIFICATE_SUPERSEDED,  # a renewal's hand-over
    )
    assert event.outcome is (Outcome.ALLOWED if normal else Outcome.DENIED)
    # Only a shutdown tells the broker goodbye (no will); every other cut is a drop to it.
    upstream = b"".join(bytes(a.data) for a in actions if isinstance(a, ToUpstream))
    shutdown = reason is Reason.SERVER_SHUTTING_DOWN
    assert upstream == (encode(Disconnect(), version=version) if shutdown else b"")
    assert actions[-1] == Close(reason)
    assert session.state is State.CLOSED
    assert session.cut(reason) == []  # once


@pytest.mark.parametrize(("version", "code"), [(4, 0x05), (5, 0x87)])
def test_cut_while_authorising_refuses_the_connect(version: int, code: int) -> None:
    session = _session()
    session.receive_device(encode(Connect(protocol_level=version, client_id="d1"), version=version))
    actions = session.cut(Reason.CERTIFICATE_REVOKED, revoked=True)
    assert _to_device(actions, version) == [Connack(reason_code=code)]
    assert not any(isinstance(a, ToUpstream) for a in actions)
    (event,) = _records(actions)
    assert (event.type, event.outcome, event.reason) == (
        EventType.CONNECT,
        Outcome.DENIED,
        Reason.CERTIFICATE_REVOKED,
    )
    # The directory's answer comes too late to matter.
    assert session.device_checked(Reason.OK) == []


def test_cut_before_connect_records_and_closes() -> None:
    session = _session()
    actions = session.cut(Reason.DEVICE_DISABLED, revoked=True)
    assert _to_device(actions, 4) == []
    (event,) = _records(actions)
    assert (event.type, event.reason) == (EventType.CONNECT, Reason.DEVICE_DISABLED)


def test_cut_while_the_connect_event_is_being_recorded_ends_the_session() -> None:
    """The connect event is on its way to the log: record the end, send no DISCONNECT (the
    device has no CONNACK yet), and admission does not happen afterwards."""
    session = _session()
    _until_connack(session, 5)
    actions = session.cut(Reason.DEVICE_REVOKED, revoked=True)
    assert _to_device(actions, 5) == []
    (event,) = _records(actions)
    assert (event.type, event.reason) == (EventType.SESSION_REVOKED, Reason.DEVICE_REVOKED)
    assert session.admitted() == []
    assert session.state is State.CLOSED


@pytest.mark.parametrize(("broker", "advertised"), [(None, 4096), (100_000, 4096), (1000, 1000)])
def test_v5_connack_advertises_the_packet_size_limit(broker: int | None, advertised: int) -> None:
    session = _session(max_packet_size=4096)
    props = Properties.of((PropertyId.MAXIMUM_PACKET_SIZE, broker)) if broker else None
    admit = _until_connack(session, 5, props)
    connack, _ = decode(admit.connack, version=5)  # type: ignore[misc]
    assert isinstance(connack, Connack)
    assert connack.properties.maximum_packet_size == advertised
    assert len(connack.properties.get_all(PropertyId.MAXIMUM_PACKET_SIZE)) == 1


def test_v311_connack_is_passed_on_unchanged() -> None:
    admit = _until_connack(_session(), 4)
    assert admit.connack == encode(Connack(reason_code=0), version=4)


def test_oversized_connect_is_packet_too_large() -> None:
    session = _session(max_packet_size=128)
    big = Connect(protocol_level=4, client_id="d1", username="u" * 200)
    actions = session.receive_device(encode(big, version=4))
    (event,) = _records(actions)
    assert (event.type, event.reason) == (EventType.CONNECT, Reason.PACKET_TOO_LARGE)
    assert actions[-1] == Close(Reason.PACKET_TOO_LARGE)


def test_oversized_publish_is_packet_too_large() -> None:
    session = _session(max_packet_size=128)
    _until_connack(session, 4)
    session.admitted()
    actions = session.receive_device(
        encode(Publish(topic="devices/d1/t", payload=b"x" * 200), version=4)
    )
    (event,) = _records(actions)
    assert (event.type, event.reason) == (EventType.SESSION_END, Reason.PACKET_TOO_LARGE)
    assert _to_device(actions, 4) == [] and actions[-1] == Close(Reason.PACKET_TOO_LARGE)
