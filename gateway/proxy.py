"""PROXY protocol version 2, receiving side, as a sans-IO parser (haproxy.org proxy-protocol.txt).

A load balancer that passes TCP through (HAProxy ``send-proxy-v2``) prefixes each
connection with a binary header naming the client's real address; the TLS ClientHello
follows. The gateway reads it before feeding its TLS pump.

Invariants:

* Sans-IO: `parse_header` takes the bytes received so far and returns a `ProxyHeader`
  (with how many bytes it used), or `NEED_DATA`. It raises only `ProxyProtocolError`, for
  any input: anything else is a bug.
* Bounded: a header is never longer than ``16 + max_length`` bytes (``max_length``
  default 4096 here, the protocol's own bound is 65535), and the parser refuses a length
  field above it as soon as the 16-byte fixed part is in, so a peer cannot make the
  caller buffer more than that.
* Strict where it matters: the 12-byte signature, version 2, command LOCAL or PROXY.
  PROXY over TCP (``AF_INET``/``AF_INET6`` + ``STREAM``) must carry its whole address
  block; datagram transports are refused (MQTT runs over streams). ``AF_UNSPEC`` and
  ``AF_UNIX`` carry no usable address: the header is accepted with ``source`` None, like
  LOCAL, and the caller uses the socket's own peer.
* LOCAL (health checks, the proxy's own connections): the address block is skipped
  whatever it holds; ``source`` is None.
* TLVs after the addresses are walked and returned (type, value); one that overruns the
  header is an error. Their meaning (ALPN, authority, CRC32C, ...) is not interpreted.
* `ProxyGate` is the per-connection front end the bridge uses: for a trusted peer the
  header is required; for an untrusted peer a stream that starts with the signature is
  refused and anything else passes through untouched (a direct TLS client).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final

from schemas.errors import DevicegateError
from schemas.events import Reason

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "NEED_DATA",
    "SIGNATURE",
    "Command",
    "NeedData",
    "ProxyGate",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse_header",
    "signature_prefix",
]

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
DEFAULT_MAX_LENGTH: Final = 4096
_FIXED: Final = 16
_FAMILY_UNSPEC, _FAMILY_INET, _FAMILY_INET6, _FAMILY_UNIX = 0, 1, 2, 3
_STREAM, _DGRAM = 1, 2
_ADDRESS_LENGTH: Final = {_FAMILY_INET: 12, _FAMILY_INET6: 36, _FAMILY_UNIX: 216}
_MAX_TLVS: Final = 256


class ProxyProtocolError(DevicegateError):
    """The bytes are not an acceptable PROXY v2 header (the message says why)."""

    reason = Reason.PROXY_PROTOCOL_ERROR


class NeedData(Enum):
    NEED_DATA = "need_data"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned while the header is incomplete: call again with more bytes."""


class Command(Enum):
    LOCAL = 0
    PROXY = 1


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header.

    Attributes:
        command: LOCAL (use the connection's own addresses) or PROXY.
        source: The client's (host, port), or None (LOCAL, UNSPEC, UNIX).
        destination: The address the client connected to, or None.
        tlvs: The type-length-value extensions, in order.
        length: How many bytes of the input the header used.
    """

    command: Command
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int


def signature_prefix(data: bytes | bytearray | memoryview) -> bool | None:
    """Whether ``data`` starts with the PROXY v2 signature: True, False, or None (too short)."""
    n = min(len(data), len(SIGNATURE))
    if bytes(data[:n]) != SIGNATURE[:n]:
        return False
    return True if n == len(SIGNATURE) else None


def parse_header(
    data: bytes | bytearray | memoryview, *, max_length: int = DEFAULT_MAX_LENGTH
) -> ProxyHeader | NeedData:
    """Parse the header at the start of ``data``.

    Args:
        data: Bytes received so far (the header, perhaps followed by the TLS bytes).
        max_length: Largest accepted value of the header's length field.

    Returns:
        The header (``length`` bytes of ``data``), or `NEED_DATA` if incomplete.

    Raises:
        ProxyProtocolError: the bytes are not a valid, acceptable header.
    """
    prefix = signature_prefix(data)
    if prefix is False:
        raise ProxyProtocolError("no PROXY v2 signature")
    if len(data) < _FIXED:
        return NEED_DATA
    version_command = data[12]
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"PROXY protocol version {version_command >> 4}, not 2")
    try:
        command = Command(version_command & 0x0F)
    except ValueError:
        raise ProxyProtocolError(f"unknown PROXY v2 command {version_command & 0x0F}") from None
    family, transport = data[13] >> 4, data[13] & 0x0F
    (length,) = struct.unpack_from("!H", data, 14)
    if length > max_length:
        raise ProxyProtocolError(f"PROXY v2 header length {length} above {max_length}")
    end = _FIXED + length
    if len(data) < end:
        return NEED_DATA
    body = bytes(data[_FIXED:end])
    if command is Command.LOCAL:
        return ProxyHeader(command, None, None, (), end)
    if family > _FAMILY_UNIX or transport > _DGRAM:
        raise ProxyProtocolError(f"unknown PROXY v2 address family/transport {data[13]:#04x}")
    if transport == _DGRAM:
        raise ProxyProtocolError("PROXY v2 over a datagram transport")
    if family == _FAMILY_UNSPEC:
        return ProxyHeader(command, None, None, (), end)
    if transport != _STREAM:
        raise ProxyProtocolError(f"PROXY v2 transport {transport} is not STREAM")
    address_length = _ADDRESS_LENGTH[family]
    if length < address_length:
        raise ProxyProtocolError(
            f"PROXY v2 address block of {length} bytes, family {family} needs {address_length}"
        )
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if family == _FAMILY_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family == _FAMILY_INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        source = (_ipv6(src), sport)
        destination = (_ipv6(dst), dport)
    return ProxyHeader(command, source, destination, _tlvs(body, address_length), end)


def _ipv6(packed: bytes) -> str:
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _tlvs(body: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    n = len(body)
    while pos < n:
        if pos + 3 > n:
            raise ProxyProtocolError("PROXY v2 TLV header cut short")
        kind = body[pos]
        size = (body[pos + 1] << 8) | body[pos + 2]
        pos += 3
        if pos + size > n:
            raise ProxyProtocolError(f"PROXY v2 TLV {kind:#04x} overruns the header")
        if len(tlvs) >= _MAX_TLVS:
            raise ProxyProtocolError("too many PROXY v2 TLVs")
        tlvs.append((kind, body[pos : pos + size]))
        pos += size
    return tuple(tlvs)


class ProxyGate:
    """The pre-TLS stage of one connection: buffer until the header is known.

    Args:
        trusted: Whether the immediate peer may (and then must) send a PROXY v2 header.
        max_length: See `parse_header`.
    """

    __slots__ = ("_buf", "max_length", "trusted")

    def __init__(self, *, trusted: bool, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.trusted = trusted
        self.max_length = max_length
        self._buf = b""

    @property
    def buffered(self) -> int:
        """How many bytes are held (received, not yet judged)."""
        return len(self._buf)

    def feed(self, data: bytes) -> tuple[ProxyHeader | None, bytes] | None:
        """Take bytes from the peer.

        Returns:
            None while undecided (more bytes needed); then ``(header, rest)``: the header
            (None for an untrusted direct client) and the bytes after it, for TLS.

        Raises:
            ProxyProtocolError: a trusted peer sent no valid header, or an untrusted peer
                sent one.
        """
        buf = self._buf + data if self._buf else data
        if not self.trusted:
            if signature_prefix(buf) is False:
                self._buf = b""
                return None, buf
            if signature_prefix(buf) is None:
                self._buf = buf
                return None
            raise ProxyProtocolError("PROXY v2 header from an address not in proxy_protocol_from")
        result = parse_header(buf, max_length=self.max_length)
        if result is NEED_DATA:
            self._buf = buf
            return None
        assert isinstance(result, ProxyHeader)
        self._buf = b""
        return result, buf[result.length :]
