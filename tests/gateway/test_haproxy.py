"""Behind a real HAProxy with ``send-proxy-v2``: events carry the device's own address, a
PROXY header from anyone else is refused, and HAProxy's health checks leave no trace."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest

from gateway.mqtt import NEED_DATA, decode, encode
from gateway.mqtt.packets import Connack, Connect, Disconnect
from gateway.proxy import SIGNATURE
from gateway.server import Gateway
from tests.gateway.clients import client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.helpers import free_port, wait_for_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DEVICE_SOURCE = "127.0.0.5"  # the device's address, distinct from HAProxy's 127.0.0.1

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy not installed")


@pytest.fixture(scope="module")
def proxied(harness: Harness) -> Iterator[Gateway]:
    """A gateway that trusts 127.0.0.1 (where HAProxy connects from) to send PROXY v2."""
    gateway = harness.start_gateway(proxy_protocol_from=(ip_network("127.0.0.1/32"),))
    yield gateway
    harness.call(gateway.close())


@pytest.fixture(scope="module")
def haproxy(proxied: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    config.write_text(
        f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s
frontend fe_mqtt
    bind 127.0.0.1:{port}
    default_backend be_gateways
backend be_gateways
    server gw 127.0.0.1:{proxied.port} send-proxy-v2 check check-send-proxy inter 100ms fall 2
"""
    )
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(5)


def _tls_connect(port: int, device: Device, *, prefix: bytes = b"") -> tuple[ssl.SSLSocket, str]:
    """Connect from DEVICE_SOURCE (optionally sending ``prefix`` first), CONNECT, CONNACK."""
    raw = socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=(DEVICE_SOURCE, 0)
    )
    local = f"{DEVICE_SOURCE}:{raw.getsockname()[1]}"
    if prefix:
        raw.sendall(prefix)
    sock = client_context(device, device.chain).wrap_socket(raw, server_hostname="localhost")
    sock.sendall(encode(Connect(protocol_level=4, client_id=device.device_id), version=4))
    buf = b""
    while True:
        data = sock.recv(4096)
        assert data, "closed before CONNACK"
        buf += data
        result = decode(buf, version=4)
        if result is not NEED_DATA:
            assert isinstance(result[0], Connack) and result[0].reason_code == 0
            return sock, local


def _proxy_header(source: str, sport: int, dest: str, dport: int) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!HH", sport, dport)
    return SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def _closed_without_tls(raw: socket.socket) -> bool:
    raw.settimeout(5)
    try:
        return raw.recv(100) == b""
    except ConnectionResetError:
        return True


def test_events_carry_the_device_address_and_checks_leave_none(
    harness: Harness, haproxy: int, make_device: DeviceFactory
) -> None:
    mark = harness.mark()
    time.sleep(0.6)  # several health checks (every 100 ms) go by
    device = make_device("proxied")
    sock, local = _tls_connect(haproxy, device)
    sock.sendall(encode(Disconnect(), version=4))
    sock.close()
    rows = harness.wait_events(2, after=mark, device_id=device.device_id)
    assert [(r["type"], r["reason"]) for r in rows] == [
        ("connect", "ok"),
        ("session_end", "client_disconnected"),
    ]
    for row in rows:
        assert row["peer_address"] == local  # the device's own address and port
        detail = row["detail"] if isinstance(row["detail"], dict) else json.loads(row["detail"])
        assert str(detail["proxy"]).startswith("127.0.0.1:")  # and HAProxy's, in the detail
    time.sleep(0.3)
    # HAProxy's checks (PROXY v2 LOCAL header, then a close, often a RST) recorded nothing.
    # A check never presents a certificate, so an event it caused would name no device;
    # the sink is shared, and a session of an earlier test may still end meanwhile (its
    # event names its device).
    from_checks = [
        (row["type"], row["reason"], row["peer_address"])
        for row in harness.events(mark)
        if row["device_id"] is None
    ]
    assert from_checks == []


def test_a_proxy_header_from_an_untrusted_address_is_refused(
    harness: Harness, proxied: Gateway, make_device: DeviceFactory
) -> None:
    mark = harness.mark()
    raw = socket.create_connection(
        ("127.0.0.1", proxied.port), timeout=5, source_address=(DEVICE_SOURCE, 0)
    )
    local = f"{DEVICE_SOURCE}:{raw.getsockname()[1]}"
    raw.sendall(_proxy_header("203.0.113.9", 4242, "127.0.0.1", proxied.port))
    assert _closed_without_tls(raw)
    raw.close()
    rows = harness.wait_events(1, after=mark, reason="proxy_protocol_error")
    assert len(rows) == 1
    assert (rows[0]["type"], rows[0]["outcome"]) == ("tls_handshake", "denied")
    assert rows[0]["peer_address"] == local  # not the spoofed 203.0.113.9
    # The same untrusted address is served as a direct TLS client.
    device = make_device("direct")
    sock, local = _tls_connect(proxied.port, device)
    sock.close()
    rows = harness.wait_events(1, after=mark, device_id=device.device_id, type="connect")
    assert rows[0]["peer_address"] == local


def test_a_trusted_peer_must_send_the_header(
    harness: Harness, proxied: Gateway, make_device: DeviceFactory
) -> None:
    mark = harness.mark()
    device = make_device("noheader")
    raw = socket.create_connection(("127.0.0.1", proxied.port), timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client_context(device, device.chain).wrap_socket(raw, server_hostname="localhost")
    raw.close()
    rows = harness.wait_events(1, after=mark, reason="proxy_protocol_error")
    assert len(rows) == 1 and str(rows[0]["peer_address"]).startswith("127.0.0.1:")
    # A LOCAL header followed by a close: a health check, no event.
    mark = harness.mark()
    raw = socket.create_connection(("127.0.0.1", proxied.port), timeout=5)
    raw.sendall(SIGNATURE + b"\x20\x00\x00\x00")
    raw.close()
    # A PROXY header then a client that gives up before TLS: no event either.
    raw = socket.create_connection(("127.0.0.1", proxied.port), timeout=5)
    raw.sendall(_proxy_header("198.51.100.4", 5555, "127.0.0.1", proxied.port))
    raw.close()
    time.sleep(0.3)
    assert [
        (r["type"], r["reason"], r["peer_address"], r["detail"]) for r in harness.events(mark)
    ] == []
