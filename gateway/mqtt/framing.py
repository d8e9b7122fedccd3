"""Frame splitting: where does the next MQTT packet end?

Invariants:

* Looks only at the fixed header (first byte + Remaining Length) and never
  copies. A strict prefix of a valid fixed header gives ``NEED_DATA``.
* The Remaining Length has at most 4 bytes and its shortest form; a 4th byte
  with the continuation bit set is malformed at once (no 5th byte can help).
* With ``max_packet_size``, a packet whose total size (fixed header
  included, as MQTT 5 counts it) exceeds the limit is refused with 0x95 as
  soon as the fixed header is complete, before its body arrives.
* The first byte (packet type, reserved flags) is not checked here:
  ``decode`` does that.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from gateway.mqtt.errors import PACKET_TOO_LARGE, MalformedPacket

__all__ = ["NEED_DATA", "NeedData", "split_frame"]


class NeedData(Enum):
    """The type of the ``NEED_DATA`` sentinel: read more bytes and try again."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


def split_frame(
    buf: bytes | bytearray | memoryview, max_packet_size: int | None = None
) -> tuple[int, int, int, int] | NeedData:
    """Locate the packet at the start of ``buf``.

    Args:
        buf: Bytes (a memoryview must have the unsigned byte format).
        max_packet_size: Refuse packets larger than this many bytes in total.

    Returns:
        ``(packet_type, flags, header_len, total_len)``: the body is
        ``buf[header_len:total_len]``; or ``NEED_DATA``.

    Raises:
        MalformedPacket: Bad Remaining Length (0x81) or too large (0x95).
    """
    n = len(buf)
    if n < 2:
        return NEED_DATA
    byte = buf[1]
    if byte < 0x80:
        length = byte
        header_len = 2
    else:
        length = byte & 0x7F
        shift = 7
        header_len = 2
        while True:
            if header_len == 5:
                raise MalformedPacket("remaining length longer than 4 bytes")
            if header_len >= n:
                return NEED_DATA
            byte = buf[header_len]
            header_len += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0:
                    raise MalformedPacket("remaining length not in its shortest form")
                break
            shift += 7
    total = header_len + length
    if max_packet_size is not None and total > max_packet_size:
        raise too_large(total, max_packet_size)
    first = buf[0]
    return first >> 4, first & 0x0F, header_len, total


def too_large(total: int, max_packet_size: int) -> MalformedPacket:
    return MalformedPacket(
        f"packet of {total} bytes exceeds the maximum of {max_packet_size}", PACKET_TOO_LARGE
    )
