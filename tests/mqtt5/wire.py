"""MQTT 5 packets written by hand, for the cases no client library will produce: a duplicate
QoS 2 PUBLISH, a QoS 2 exchange left half done, a whole session in one write.

Deliberately independent of `gateway.mqtt`: a codec bug must not hide behind the very codec
under test. Only the fixed header is parsed on the way back; the rest of each packet is kept
as bytes, so two runs can be compared byte for byte.
"""

from __future__ import annotations

import socket
import struct
import time

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, DISCONNECT = 8, 9, 14
NAMES = {
    2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
    9: "SUBACK", 11: "UNSUBACK", 13: "PINGRESP", 14: "DISCONNECT",
}  # fmt: skip

# Property identifiers used here (MQTT 5, 2.2.2.2).
SESSION_EXPIRY, RECEIVE_MAXIMUM = 0x11, 0x21


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def props(*items: bytes) -> bytes:
    block = b"".join(items)
    return varint(len(block)) + block


def u32(prop: int, value: int) -> bytes:
    return bytes([prop]) + struct.pack("!I", value)


def u16(prop: int, value: int) -> bytes:
    return bytes([prop]) + struct.pack("!H", value)


def connect(
    client_id: str,
    *,
    clean_start: bool = True,
    properties: bytes = b"\x00",
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """CONNECT; ``will`` (topic, payload) is sent at QoS 1 without properties."""
    flags = 0x02 if clean_start else 0x00
    tail = utf8(client_id)
    if will is not None:
        flags |= 0x04 | 1 << 3
        tail += b"\x00" + utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    body = utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", 30) + properties
    return frame(CONNECT << 4, body + tail)


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    first = PUBLISH << 4 | (8 if dup else 0) | qos << 1 | (1 if retain else 0)
    pid = struct.pack("!H", packet_id) if qos else b""
    return frame(first, utf8(topic) + pid + b"\x00" + payload)


def ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP with reason code 0 (the short form)."""
    return frame(kind << 4 | (2 if kind == PUBREL else 0), struct.pack("!H", packet_id))


def subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00" + utf8(topic_filter) + bytes([qos])
    return frame(SUBSCRIBE << 4 | 2, body)


def disconnect(reason_code: int = 0) -> bytes:
    return frame(DISCONNECT << 4, bytes([reason_code, 0]))


Packet = tuple[str, int, bytes]
"""(type name, fixed-header flags, the bytes after the fixed header)."""


class Wire:
    """A socket (TCP, or TLS through the gateway) read packet by packet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, *packets: bytes) -> None:
        """All of ``packets`` in one write."""
        self.sock.sendall(b"".join(packets))

    def recv(self, timeout: float = 5.0) -> Packet | None:
        """The next packet; None when the peer closed. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self._split()
            if packet is not None:
                return packet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError:
                return None
            if not data:
                return None
            self.buf += data

    def recv_all(self, quiet: float = 0.3) -> list[Packet | None]:
        """Every packet until ``quiet`` seconds pass without one (None marks a close)."""
        out: list[Packet | None] = []
        while True:
            try:
                packet = self.recv(timeout=quiet)
            except TimeoutError:
                return out
            out.append(packet)
            if packet is None:
                return out

    def _split(self) -> Packet | None:
        buf = self.buf
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(buf):
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                break
            shift += 7
        if len(buf) < i + length:
            return None
        self.buf = buf[i + length :]
        return NAMES.get(buf[0] >> 4, str(buf[0] >> 4)), buf[0] & 0x0F, buf[i : i + length]

    def close(self) -> None:
        self.sock.close()
