"""MQTT data representations (section 1.5): read from a buffer, write to bytes.

Invariants:

* Readers take ``(mv, pos, end)``: ``mv`` is a read-only, one-dimensional
  byte memoryview, and they never look at ``mv[end:]`` (the next packet).
  They return ``(value, new_pos)`` or raise ``MalformedPacket``.
* Strings are UTF-8 without U+0000 and without surrogates (Python's strict
  codec refuses encoded surrogates and overlong forms).
* Variable byte integers have at most 4 bytes and use the fewest bytes
  (MQTT-1.5.5-1), so every value has exactly one encoding.
* Writers raise ``MalformedPacket`` for values that cannot be encoded.
"""

from __future__ import annotations

from typing import Final

from gateway.mqtt.errors import MalformedPacket

MAX_VARINT: Final = 268_435_455
MAX_U16: Final = 0xFFFF
MAX_U32: Final = 0xFFFF_FFFF


def read_varint(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Read a variable byte integer at ``pos``."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= end:
            raise MalformedPacket("truncated variable byte integer")
        byte = mv[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i:
                raise MalformedPacket("variable byte integer not in its shortest form")
            return value, pos + i + 1
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def read_u16(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("truncated two byte integer")
    return (mv[pos] << 8) | mv[pos + 1], pos + 2


def read_u32(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise MalformedPacket("truncated four byte integer")
    return int.from_bytes(mv[pos : pos + 4], "big"), pos + 4


def read_binary(mv: memoryview, pos: int, end: int) -> tuple[bytes, int]:
    """Read two-byte-length-prefixed binary data (copied: small fields only)."""
    if pos + 2 > end:
        raise MalformedPacket("truncated binary data length")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise MalformedPacket("truncated binary data")
    return mv[pos + 2 : stop].tobytes(), stop


def read_utf8(mv: memoryview, pos: int, end: int) -> tuple[str, int]:
    """Read a two-byte-length-prefixed UTF-8 string."""
    if pos + 2 > end:
        raise MalformedPacket("truncated string length")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise MalformedPacket("truncated string")
    return decode_utf8(mv[pos + 2 : stop]), stop


def decode_utf8(raw: memoryview) -> str:
    """Decode an MQTT UTF-8 string without copying the bytes first."""
    try:
        s = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("invalid UTF-8 string") from None
    if "\x00" in s:
        raise MalformedPacket("string contains U+0000")
    return s


def varint(value: int) -> bytes:
    """Encode a variable byte integer."""
    if value < 128:
        if value < 0:
            raise MalformedPacket(f"variable byte integer out of range: {value}")
        return bytes((value,))
    if value > MAX_VARINT:
        raise MalformedPacket(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def u16(value: int) -> bytes:
    if not 0 <= value <= MAX_U16:
        raise MalformedPacket(f"two byte integer out of range: {value}")
    return value.to_bytes(2, "big")


def u32(value: int) -> bytes:
    if not 0 <= value <= MAX_U32:
        raise MalformedPacket(f"four byte integer out of range: {value}")
    return value.to_bytes(4, "big")


def utf8(s: str) -> bytes:
    """Encode a two-byte-length-prefixed UTF-8 string."""
    if "\x00" in s:
        raise MalformedPacket("string contains U+0000")
    try:
        raw = s.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedPacket("string is not valid Unicode (surrogate)") from None
    return binary(raw)


def binary(raw: bytes | memoryview) -> bytes:
    """Encode two-byte-length-prefixed binary data."""
    n = len(raw)
    if n > MAX_U16:
        raise MalformedPacket(f"string or binary data longer than {MAX_U16} bytes")
    return n.to_bytes(2, "big") + raw
