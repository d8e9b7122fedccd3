"""The errors of the MQTT layer.

Invariants:

* ``MalformedPacket`` is the only exception the codec raises for any input
  bytes. It carries the MQTT 5 reason code to send in a DISCONNECT (or a
  CONNACK) before closing: 0x81 Malformed Packet, 0x82 Protocol Error or
  0x95 Packet Too Large. On MQTT 3.1.1 there is nothing to send: close.
* ``UnsupportedProtocolVersion`` is the one case where the peer is owed an
  answer on 3.1.1 too: CONNACK return code 0x01 (3.1.1) or reason code 0x84
  (5.0). It carries the protocol name and level that were found.
* ``InvalidTopic`` is raised by the topic module; the codec turns it into a
  ``MalformedPacket`` (or a Protocol Error where the spec says so).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MALFORMED_PACKET",
    "PACKET_TOO_LARGE",
    "PROTOCOL_ERROR",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "InvalidTopic",
    "MalformedPacket",
    "UnsupportedProtocolVersion",
]

MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
PACKET_TOO_LARGE: Final = 0x95


class MalformedPacket(ValueError):
    """The bytes are not a valid MQTT packet.

    Attributes:
        reason: A short human explanation (for logs and the audit detail).
        v5_reason_code: The MQTT 5 reason code to close with.
    """

    def __init__(self, reason: str, v5_reason_code: int = MALFORMED_PACKET) -> None:
        super().__init__(reason)
        self.reason = reason
        self.v5_reason_code = v5_reason_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, 0x{self.v5_reason_code:02X})"


class UnsupportedProtocolVersion(MalformedPacket):
    """A CONNECT for a protocol this codec does not speak (e.g. MQTT 3.1 "MQIsdp").

    The server answers with CONNACK 0x01 (3.1.1 form) or 0x84 (5.0) and closes.

    Attributes:
        protocol_name: The protocol name found in the CONNECT.
        protocol_level: The protocol level byte found in the CONNECT.
        v3_return_code: The MQTT 3.1.1 CONNACK return code, 0x01.
    """

    v3_return_code: Final = 0x01

    def __init__(self, protocol_name: str, protocol_level: int) -> None:
        super().__init__(
            f"unsupported protocol {protocol_name!r} level {protocol_level}",
            UNSUPPORTED_PROTOCOL_VERSION,
        )
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level


class InvalidTopic(ValueError):
    """A topic name or topic filter that breaks the rules of MQTT section 4.7."""
