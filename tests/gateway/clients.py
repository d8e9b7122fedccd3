"""A raw MQTT-over-TLS test client: exact bytes out, exact packets back (blocking)."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from gateway.mqtt import NEED_DATA, Connack, Connect, Packet, decode, encode
from tests.gateway.conftest import Device


def client_context(
    device: Device | None, chain: Any, *, tls_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(chain))
    if device is not None:
        context.load_cert_chain(str(device.cert), str(device.key))
    if tls_version is not None:
        context.minimum_version = tls_version
        context.maximum_version = tls_version
    return context


class RawClient:
    """One TLS connection to the gateway speaking MQTT packet by packet."""

    def __init__(
        self,
        port: int,
        device: Device | None,
        chain: Any,
        *,
        version: int = 4,
        tls_version: ssl.TLSVersion | None = None,
        timeout: float = 5.0,
        source: str | None = None,
    ) -> None:
        self.version = version
        context = client_context(device, chain, tls_version=tls_version)
        raw = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def send(self, packet: Packet) -> None:
        self.sock.sendall(encode(packet, version=self.version))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None when the gateway closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            if self.buf:
                result = decode(self.buf, version=self.version)
                if result is not NEED_DATA:
                    packet, used = result
                    self.buf = self.buf[used:]
                    if hasattr(packet, "payload"):
                        packet = _detach(packet)
                    return packet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the gateway")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            if not data:
                return None
            self.buf += data

    def connect(self, client_id: str, **kwargs: Any) -> Connack:
        self.send(Connect(protocol_level=self.version, client_id=client_id, **kwargs))
        packet = self.recv()
        assert isinstance(packet, Connack), packet
        return packet

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the gateway closes the connection (reading and dropping packets)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.recv(timeout=deadline - time.monotonic()) is None:
                    return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detach(packet: Any) -> Any:
    from dataclasses import replace

    return replace(packet, payload=bytes(packet.payload))
