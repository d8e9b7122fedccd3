"""A refusal reaches the device only after its event is recorded (issue 5: "Refusals are
recorded the same way before the socket closes").

The harness's sink is slowed to 300 ms per event, as a spool on a slow disk would be. When
the client sees its refusal (a CONNACK with a failure code, or the TLS alert and close),
the event must already be in ``auth_events``: these tests read the table at once, without
waiting, so a gateway that closed first and recorded later fails them.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from gateway.mqtt import Connect
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness

SLOW = 0.3


@pytest.fixture
def slow_sink(harness: Harness) -> Iterator[Harness]:
    harness.sink.delay = SLOW
    try:
        yield harness
    finally:
        harness.sink.delay = 0.0


@pytest.mark.parametrize(("version", "code"), [(4, 0x02), (5, 0x85)])
def test_connect_refusal_is_recorded_before_the_connack(
    slow_sink: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    device, other = make_device("durable-me"), make_device("durable-other")
    mark = slow_sink.mark()
    with RawClient(slow_sink.port, device, device.chain, version=version) as client:
        started = time.monotonic()
        assert client.connect(other.device_id).reason_code == code
        waited = time.monotonic() - started
        rows = slow_sink.events(after=mark, type="connect")  # at once: no polling
        assert client.closed()
    assert [(r["outcome"], r["reason"]) for r in rows] == [("denied", "client_id_mismatch")]
    assert waited >= SLOW * 0.9, "the refusal went out before its event could be written"


def test_tls_refusal_is_recorded_before_the_socket_closes(slow_sink: Harness, pki: Pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.chain))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # the alert ends the handshake itself
    mark = slow_sink.mark()
    raw = socket.create_connection(("127.0.0.1", slow_sink.port), timeout=5)
    try:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            context.wrap_socket(raw, server_hostname="localhost")  # no client certificate
    finally:
        raw.close()
    rows = slow_sink.events(after=mark, type="tls_handshake")  # at once: no polling
    assert [(r["outcome"], r["reason"]) for r in rows] == [("denied", "no_client_certificate")]


def test_a_device_gone_during_the_hold_is_still_recorded_and_harmless(
    slow_sink: Harness, make_device: DeviceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    device, other = make_device("durable-gone"), make_device("durable-else")
    mark = slow_sink.mark()
    with RawClient(slow_sink.port, device, device.chain) as client:
        client.send(Connect(protocol_level=4, client_id=other.device_id))
        time.sleep(SLOW / 3)  # the refusal is being recorded; hang up before it goes out
    with caplog.at_level(logging.ERROR):
        rows = slow_sink.wait_events(after=mark, type="connect", timeout=5)
        time.sleep(0.1)  # the held close runs once the record completes
    assert [(r["outcome"], r["reason"]) for r in rows] == [("denied", "client_id_mismatch")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    with RawClient(slow_sink.port, device, device.chain) as client:  # the gateway serves on
        assert client.connect(device.device_id).reason_code == 0
