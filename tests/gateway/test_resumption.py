"""TLS session resumption (issue 24): real tickets, real clients, a resumed session judged
like a new one.

Each gateway here has its own ``SSL_CTX`` (as each worker process and instance has); they
share only the ticket key file, so a ticket that resumes on another gateway shows the key
sharing works across workers and instances.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.mqtt import NEED_DATA, Connack, Connect, decode, encode
from gateway.server import Gateway
from gateway.tickets import RESUMPTION, TicketKeys
from gateway.tls import server_context
from schemas.ticket_keys import rotate_ticket_keys
from tests.conftest import Pki
from tests.gateway.clients import client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness

pytestmark = pytest.mark.skipif(not RESUMPTION, reason="gateway._tlsext is not built")


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "ticket-keys"
    rotate_ticket_keys(path)
    return path


def _start(harness: Harness, pki: Pki, keys: Path | None, lifetime: float = 3600) -> Gateway:
    context = server_context(pki.chain, pki.server_cert, pki.server_key)
    tickets = TicketKeys(context, keys, lifetime) if keys is not None else None
    return harness.start_gateway(ssl_context=context, tickets=tickets)


@pytest.fixture
def gateways(harness: Harness, pki: Pki, keys: Path) -> Iterator[tuple[Gateway, Gateway]]:
    pair = (_start(harness, pki, keys), _start(harness, pki, keys))
    yield pair
    for gateway in pair:
        harness.call(gateway.close())


_contexts: dict[tuple[Path, ssl.TLSVersion | None], ssl.SSLContext] = {}


class Attempt:
    """One connection: the CONNACK (None: closed before one), the ticket, reuse."""

    def __init__(
        self,
        port: int,
        device: Device,
        session: ssl.SSLSession | None = None,
        tls_version: ssl.TLSVersion | None = None,
    ) -> None:
        # Python resumes a session only through the context that made it: one per device.
        context = _contexts.get((device.cert, tls_version))
        if context is None:
            context = client_context(device, device.chain, tls_version=tls_version)
            _contexts[(device.cert, tls_version)] = context
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as sock,
        ):
            self.reused = sock.session_reused
            self.connack: Connack | None = None
            try:
                sock.sendall(
                    encode(Connect(protocol_level=4, client_id=device.device_id), version=4)
                )
                data = b""
                result: object = NEED_DATA
                while result is NEED_DATA:
                    chunk = sock.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                    result = decode(data, version=4)
                if isinstance(result, tuple) and isinstance(result[0], Connack):
                    self.connack = result[0]
            except (ssl.SSLError, ConnectionError):
                pass
            self.session = sock.session


def _connect_event(harness: Harness, mark: int, device: Device) -> dict[str, object]:
    (row,) = harness.wait_events(after=mark, type="connect", device_id=device.device_id)
    return {"reason": row["reason"], "detail": json.loads(row["detail"])}


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_a_ticket_resumes_here_and_on_another_gateway(
    harness: Harness,
    gateways: tuple[Gateway, Gateway],
    make_device: DeviceFactory,
    tls_version: ssl.TLSVersion,
) -> None:
    first, second = gateways
    device = make_device()
    full = Attempt(first.port, device, tls_version=tls_version)
    assert full.connack == Connack(reason_code=0) and not full.reused
    assert full.session is not None and full.session.has_ticket
    for gateway in (first, second):
        mark = harness.mark()
        resumed = Attempt(gateway.port, device, full.session, tls_version=tls_version)
        assert resumed.reused, gateway.port
        assert resumed.connack == Connack(reason_code=0)
        event = _connect_event(harness, mark, device)
        assert event["reason"] == "ok"
        assert event["detail"]["resumed"] is True  # type: ignore[index]


def test_a_full_handshake_is_not_marked_resumed(
    harness: Harness, gateways: tuple[Gateway, Gateway], make_device: DeviceFactory
) -> None:
    device = make_device()
    mark = harness.mark()
    assert Attempt(gateways[0].port, device).connack == Connack(reason_code=0)
    assert "resumed" not in _connect_event(harness, mark, device)["detail"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("table", "column", "status", "reason"),
    [
        ("certificates", "status", "revoked", "certificate_revoked"),
        ("certificates", "status", "superseded", "certificate_superseded"),
        ("devices", "status", "disabled", "device_disabled"),
        ("devices", "status", "revoked", "device_revoked"),
    ],
)
def test_a_resumed_session_is_refused_like_a_full_handshake(
    harness: Harness,
    gateways: tuple[Gateway, Gateway],
    make_device: DeviceFactory,
    table: str,
    column: str,
    status: str,
    reason: str,
) -> None:
    gateway = gateways[0]
    device = make_device()
    ticket = Attempt(gateway.port, device).session
    key = "serial" if table == "certificates" else "device_id"
    value = device.serial if table == "certificates" else device.device_id
    extra = ", revoked_at = now()" if table == "certificates" and status == "revoked" else ""
    harness.execute(f"UPDATE {table} SET {column} = $1{extra} WHERE {key} = $2", status, value)

    mark = harness.mark()
    full = Attempt(gateway.port, device)
    full_event = _connect_event(harness, mark, device)
    mark = harness.mark()
    resumed = Attempt(gateway.port, device, ticket)
    resumed_event = _connect_event(harness, mark, device)
    assert resumed.reused and not full.reused
    assert resumed.connack == full.connack == Connack(reason_code=0x05)
    assert resumed_event["reason"] == full_event["reason"] == reason
    assert resumed_event["detail"]["resumed"] is True  # type: ignore[index]


def test_a_ticket_past_its_certificate_is_not_accepted(
    harness: Harness, gateways: tuple[Gateway, Gateway], make_device: DeviceFactory
) -> None:
    gateway = gateways[0]
    device = make_device(not_after=datetime.now(UTC) + timedelta(seconds=3))
    ticket = Attempt(gateway.port, device).session
    assert ticket is not None and ticket.ticket_lifetime_hint <= 3  # follows notAfter
    time.sleep(max(0.0, 3.5 - (time.time() - ticket.time)))
    mark = harness.mark()
    again = Attempt(gateway.port, device, ticket)
    assert not again.reused and again.connack is None
    (row,) = harness.wait_events(after=mark, type="tls_handshake")
    assert row["reason"] == "certificate_expired"


def test_rotated_out_keys_stop_resuming(
    harness: Harness, gateways: tuple[Gateway, Gateway], make_device: DeviceFactory, keys: Path
) -> None:
    gateway = gateways[0]
    device = make_device()
    ticket = Attempt(gateway.port, device).session
    tickets = gateway.config.tickets
    assert tickets is not None

    rotate_ticket_keys(keys, keep=1)  # the ticket's key only decrypts now
    assert tickets.refresh()
    renewed = Attempt(gateway.port, device, ticket)
    assert renewed.reused and renewed.connack == Connack(reason_code=0)

    rotate_ticket_keys(keys, keep=0)  # ... and now it is gone
    assert tickets.refresh()
    again = Attempt(gateway.port, device, ticket)
    assert not again.reused and again.connack == Connack(reason_code=0)  # a full handshake


def test_resumption_off(harness: Harness, pki: Pki, make_device: DeviceFactory) -> None:
    gateway = _start(harness, pki, None)
    try:
        device = make_device()
        first = Attempt(gateway.port, device)
        assert first.session is not None and not first.session.has_ticket
        again = Attempt(gateway.port, device, first.session)
        assert not again.reused and again.connack == Connack(reason_code=0)
    finally:
        harness.call(gateway.close())


def test_a_ticket_lives_at_most_the_setting(
    harness: Harness, pki: Pki, keys: Path, make_device: DeviceFactory
) -> None:
    gateway = _start(harness, pki, keys, lifetime=2)
    try:
        device = make_device()
        ticket = Attempt(gateway.port, device).session
        assert ticket is not None and 0 < ticket.ticket_lifetime_hint <= 2
        time.sleep(max(0.0, 2.5 - (time.time() - ticket.time)))
        again = Attempt(gateway.port, device, ticket)
        assert not again.reused and again.connack == Connack(reason_code=0)
    finally:
        harness.call(gateway.close())


def test_resuming_issues_no_new_ticket(
    harness: Harness, pki: Pki, keys: Path, make_device: DeviceFactory
) -> None:
    """A resumed TLS 1.3 handshake gets no new ticket (no ticket CPU per resumed reconnect),
    so resuming again and again never stretches a ticket past the lifetime counted from
    its full handshake: the device's next full handshake verifies its chain again."""
    gateway = _start(harness, pki, keys, lifetime=2)
    try:
        device = make_device()
        ticket = Attempt(gateway.port, device, tls_version=ssl.TLSVersion.TLSv1_3).session
        assert ticket is not None and ticket.has_ticket
        resumed = Attempt(gateway.port, device, ticket, tls_version=ssl.TLSVersion.TLSv1_3)
        assert resumed.reused and resumed.connack == Connack(reason_code=0)
        kept = resumed.session
        assert kept is not None and kept.id == ticket.id and kept.time == ticket.time
        time.sleep(max(0.0, 2.5 - (time.time() - ticket.time)))
        again = Attempt(gateway.port, device, kept, tls_version=ssl.TLSVersion.TLSv1_3)
        assert not again.reused and again.connack == Connack(reason_code=0)
    finally:
        harness.call(gateway.close())
