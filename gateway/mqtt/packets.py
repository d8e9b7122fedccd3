"""The MQTT control packets as immutable values.

Invariants:

* One frozen, slotted dataclass per packet type; arguments are keyword-only.
  Two packets are equal when they would encode to the same bytes (except the
  optional-field shortcuts of MQTT 5, e.g. a PUBACK with reason code 0 and no
  properties, which the encoder always writes in the shortest form).
* Fields hold wire values: QoS 0-2, packet identifiers 1-65535, reason codes
  as plain ints (the codec does not check MQTT 5 reason code tables; the
  3.1.1 CONNACK and SUBACK tables are checked). MQTT 3.1.1 packets carry
  ``EMPTY_PROPERTIES`` and reason code 0 where 3.1.1 has none.
* ``Publish.payload`` (and ``RawPacket.body``) may be a read-only memoryview
  into the buffer that was decoded: see ``gateway.mqtt.codec.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Final, TypeAlias

from gateway.mqtt.properties import EMPTY_PROPERTIES, Properties

__all__ = [
    "Auth",
    "Connack",
    "Connect",
    "Disconnect",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "RawPacket",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
]

MQTT_3_1_1: Final = 4
MQTT_5: Final = 5
# The fixed header flags each packet type must carry (PUBLISH: its own flags).
REQUIRED_FLAGS: Final = (-1, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    """The Will Message of a CONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    """CONNECT. ``protocol_level`` is 4 (MQTT 3.1.1) or 5 (MQTT 5.0).

    ``clean_start`` is the Clean Session flag on 3.1.1. ``password`` without
    ``username`` is only valid on MQTT 5.
    """

    TYPE: ClassVar[PacketType] = PacketType.CONNECT
    protocol_level: int
    client_id: str
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Connack:
    """CONNACK. ``reason_code`` is the return code on 3.1.1 (0-5)."""

    TYPE: ClassVar[PacketType] = PacketType.CONNACK
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """PUBLISH. ``packet_id`` is None exactly when ``qos`` is 0.

    ``topic`` may be empty only on MQTT 5 with a Topic Alias property.
    """

    TYPE: ClassVar[PacketType] = PacketType.PUBLISH
    topic: str
    payload: bytes | memoryview = field(default=b"", hash=False)  # may view a bytearray
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = EMPTY_PROPERTIES

    @property
    def topic_alias(self) -> int | None:
        """The Topic Alias property (MQTT 5), not interpreted by the codec."""
        return self.properties.topic_alias

    def __repr__(self) -> str:
        return (
            f"Publish(topic={self.topic!r}, payload={_show(self.payload)}, qos={self.qos}, "
            f"retain={self.retain}, dup={self.dup}, packet_id={self.packet_id}, "
            f"properties={self.properties!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _PublishResponse:
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Puback(_PublishResponse):
    TYPE: ClassVar[PacketType] = PacketType.PUBACK


@dataclass(frozen=True, slots=True, kw_only=True)
class Pubrec(_PublishResponse):
    TYPE: ClassVar[PacketType] = PacketType.PUBREC


@dataclass(frozen=True, slots=True, kw_only=True)
class Pubrel(_PublishResponse):
    TYPE: ClassVar[PacketType] = PacketType.PUBREL


@dataclass(frozen=True, slots=True, kw_only=True)
class Pubcomp(_PublishResponse):
    TYPE: ClassVar[PacketType] = PacketType.PUBCOMP


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (only ``qos`` on 3.1.1)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    TYPE: ClassVar[PacketType] = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Suback:
    """SUBACK: one return code (3.1.1) or reason code (5) per subscription."""

    TYPE: ClassVar[PacketType] = PacketType.SUBACK
    packet_id: int
    reason_codes: tuple[int, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    TYPE: ClassVar[PacketType] = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsuback:
    """UNSUBACK: no reason codes on 3.1.1, one per topic filter on 5."""

    TYPE: ClassVar[PacketType] = PacketType.UNSUBACK
    packet_id: int
    reason_codes: tuple[int, ...] = ()
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Pingreq:
    TYPE: ClassVar[PacketType] = PacketType.PINGREQ


@dataclass(frozen=True, slots=True, kw_only=True)
class Pingresp:
    TYPE: ClassVar[PacketType] = PacketType.PINGRESP


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect:
    """DISCONNECT: empty on 3.1.1, reason code and properties on 5."""

    TYPE: ClassVar[PacketType] = PacketType.DISCONNECT
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """AUTH (MQTT 5 only)."""

    TYPE: ClassVar[PacketType] = PacketType.AUTH
    reason_code: int = 0
    properties: Properties = EMPTY_PROPERTIES


@dataclass(frozen=True, slots=True, kw_only=True)
class RawPacket:
    """Any packet as fixed header fields and an undecoded body.

    ``decode`` never returns one for MQTT 3.1.1 or 5.0, whose packet types
    are all known; ``encode`` writes one as is, which lets a bridge forward a
    frame it located with ``split_frame`` (or build one) without decoding.
    """

    packet_type: int
    flags: int
    body: bytes | memoryview = field(default=b"", hash=False)

    def __repr__(self) -> str:
        return (
            f"RawPacket(packet_type={self.packet_type}, flags={self.flags}, "
            f"body={_show(self.body)})"
        )


def _show(data: bytes | memoryview) -> str:
    """A payload for a repr: the bytes when short (a memoryview shows no content)."""
    if len(data) <= 64:
        return repr(bytes(data))
    return f"<{len(data)} bytes: {bytes(data[:32])!r}...>"


Packet: TypeAlias = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
    | RawPacket
)
