"""MQTT 5 properties (section 2.2.2): the table, the value, the wire form.

Invariants:

* ``Properties`` keeps the identifiers and values in wire order, so decoding
  then encoding gives the same bytes, and ``decode(encode(p)) == p``.
* Every identifier of the spec is known with its data type and the packets
  it may appear in. An unknown identifier, or one not allowed in that packet,
  or a value of the wrong type, is a Malformed Packet (0x81).
* Only User Property repeats (and Subscription Identifier, in PUBLISH only);
  any other repetition is a Protocol Error (0x82), as are the values the spec
  forbids: 0 for Receive Maximum, Maximum Packet Size and Subscription
  Identifier, anything but 0/1 for the boolean-like bytes, a wildcard in a
  Response Topic.
* Topic Alias semantics (0, above the maximum: 0x94) belong to the session.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from gateway.mqtt import _wire
from gateway.mqtt.errors import PROTOCOL_ERROR, MalformedPacket

__all__ = [
    "EMPTY_PROPERTIES",
    "Properties",
    "PropertyId",
    "PropertyValue",
]

PropertyValue = int | str | bytes | tuple[str, str]
"""int (byte, two/four byte integer, variable byte integer), str (UTF-8
string), bytes (binary data), tuple[str, str] (User Property)."""


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class PropertyType(IntEnum):
    BYTE = 1
    U16 = 2
    U32 = 3
    VARINT = 4
    UTF8 = 5
    BINARY = 6
    PAIR = 7


# Where a property may appear: the packet type (section 2.1.2), or WILL for
# the Will Properties of a CONNECT.
WILL: Final = 0
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH = 8, 9, 10, 11, 14, 15

_P = PropertyId
_T = PropertyType
_MESSAGE = frozenset({PUBLISH, WILL})
_ALL = frozenset({CONNECT, CONNACK, PUBLISH, WILL, PUBACK, PUBREC, PUBREL, PUBCOMP})
_ALL |= {SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH}

# identifier -> (data type, where it may appear)
SPEC: Final[dict[int, tuple[PropertyType, frozenset[int]]]] = {
    _P.PAYLOAD_FORMAT_INDICATOR: (_T.BYTE, _MESSAGE),
    _P.MESSAGE_EXPIRY_INTERVAL: (_T.U32, _MESSAGE),
    _P.CONTENT_TYPE: (_T.UTF8, _MESSAGE),
    _P.RESPONSE_TOPIC: (_T.UTF8, _MESSAGE),
    _P.CORRELATION_DATA: (_T.BINARY, _MESSAGE),
    _P.SUBSCRIPTION_IDENTIFIER: (_T.VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    _P.SESSION_EXPIRY_INTERVAL: (_T.U32, frozenset({CONNECT, CONNACK, DISCONNECT})),
    _P.ASSIGNED_CLIENT_IDENTIFIER: (_T.UTF8, frozenset({CONNACK})),
    _P.SERVER_KEEP_ALIVE: (_T.U16, frozenset({CONNACK})),
    _P.AUTHENTICATION_METHOD: (_T.UTF8, frozenset({CONNECT, CONNACK, AUTH})),
    _P.AUTHENTICATION_DATA: (_T.BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    _P.REQUEST_PROBLEM_INFORMATION: (_T.BYTE, frozenset({CONNECT})),
    _P.WILL_DELAY_INTERVAL: (_T.U32, frozenset({WILL})),
    _P.REQUEST_RESPONSE_INFORMATION: (_T.BYTE, frozenset({CONNECT})),
    _P.RESPONSE_INFORMATION: (_T.UTF8, frozenset({CONNACK})),
    _P.SERVER_REFERENCE: (_T.UTF8, frozenset({CONNACK, DISCONNECT})),
    _P.REASON_STRING: (
        _T.UTF8,
        frozenset({CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    ),
    _P.RECEIVE_MAXIMUM: (_T.U16, frozenset({CONNECT, CONNACK})),
    _P.TOPIC_ALIAS_MAXIMUM: (_T.U16, frozenset({CONNECT, CONNACK})),
    _P.TOPIC_ALIAS: (_T.U16, frozenset({PUBLISH})),
    _P.MAXIMUM_QOS: (_T.BYTE, frozenset({CONNACK})),
    _P.RETAIN_AVAILABLE: (_T.BYTE, frozenset({CONNACK})),
    _P.USER_PROPERTY: (_T.PAIR, _ALL),
    _P.MAXIMUM_PACKET_SIZE: (_T.U32, frozenset({CONNECT, CONNACK})),
    _P.WILDCARD_SUBSCRIPTION_AVAILABLE: (_T.BYTE, frozenset({CONNACK})),
    _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (_T.BYTE, frozenset({CONNACK})),
    _P.SHARED_SUBSCRIPTION_AVAILABLE: (_T.BYTE, frozenset({CONNACK})),
}
BOOLEAN_BYTES: Final = frozenset(
    {
        _P.PAYLOAD_FORMAT_INDICATOR,
        _P.REQUEST_PROBLEM_INFORMATION,
        _P.REQUEST_RESPONSE_INFORMATION,
        _P.MAXIMUM_QOS,
        _P.RETAIN_AVAILABLE,
        _P.WILDCARD_SUBSCRIPTION_AVAILABLE,
        _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        _P.SHARED_SUBSCRIPTION_AVAILABLE,
    }
)
NON_ZERO: Final = frozenset(
    {_P.RECEIVE_MAXIMUM, _P.MAXIMUM_PACKET_SIZE, _P.SUBSCRIPTION_IDENTIFIER}
)
# The codec's lookup table, in plain ints (enum attribute access is slow):
# identifier byte -> (id, type, allowed in, may repeat in, value rule); None if unknown.
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = (int(t) for t in PropertyType)
_RULE_NONE, _RULE_BOOLEAN, _RULE_NON_ZERO, _RULE_TOPIC = 0, 1, 2, 3
_Entry = tuple[PropertyId, int, frozenset[int], frozenset[int], int]
_BY_BYTE: Final[list[_Entry | None]] = [None] * 256
for _pid, (_ptype, _contexts) in SPEC.items():
    _BY_BYTE[_pid] = (
        PropertyId(_pid),
        int(_ptype),
        _contexts,
        _contexts
        if _pid == _P.USER_PROPERTY
        else frozenset({PUBLISH})
        if _pid == _P.SUBSCRIPTION_IDENTIFIER
        else frozenset(),
        _RULE_BOOLEAN
        if _pid in BOOLEAN_BYTES
        else _RULE_NON_ZERO
        if _pid in NON_ZERO
        else _RULE_TOPIC
        if _pid == _P.RESPONSE_TOPIC
        else _RULE_NONE,
    )


@dataclass(frozen=True, slots=True)
class Properties:
    """MQTT 5 properties in wire order.

    Build with ``Properties.of((PropertyId.TOPIC_ALIAS, 3), ...)``; read with
    ``get`` / ``get_all`` or the typed shortcuts. On MQTT 3.1.1 every packet
    has ``EMPTY_PROPERTIES``.
    """

    items: tuple[tuple[PropertyId, PropertyValue], ...] = ()

    @classmethod
    def of(cls, *items: tuple[int, PropertyValue]) -> Properties:
        """Build from ``(identifier, value)`` pairs; raises ValueError for unknown ids."""
        return cls(tuple((PropertyId(pid), value) for pid, value in items))

    @classmethod
    def from_iterable(cls, items: Iterable[tuple[int, PropertyValue]]) -> Properties:
        return cls.of(*items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def get(self, pid: PropertyId) -> PropertyValue | None:
        """The first value of ``pid``, or None."""
        for key, value in self.items:
            if key == pid:
                return value
        return None

    def get_all(self, pid: PropertyId) -> tuple[PropertyValue, ...]:
        return tuple(value for key, value in self.items if key == pid)

    def _int(self, pid: PropertyId) -> int | None:
        value = self.get(pid)
        return value if isinstance(value, int) else None

    def _str(self, pid: PropertyId) -> str | None:
        value = self.get(pid)
        return value if isinstance(value, str) else None

    @property
    def user_properties(self) -> tuple[tuple[str, str], ...]:
        return tuple(v for k, v in self.items if k == _P.USER_PROPERTY and isinstance(v, tuple))

    @property
    def topic_alias(self) -> int | None:
        return self._int(_P.TOPIC_ALIAS)

    @property
    def subscription_identifiers(self) -> tuple[int, ...]:
        return tuple(
            v for k, v in self.items if k == _P.SUBSCRIPTION_IDENTIFIER and isinstance(v, int)
        )

    @property
    def session_expiry_interval(self) -> int | None:
        return self._int(_P.SESSION_EXPIRY_INTERVAL)

    @property
    def receive_maximum(self) -> int | None:
        return self._int(_P.RECEIVE_MAXIMUM)

    @property
    def maximum_packet_size(self) -> int | None:
        return self._int(_P.MAXIMUM_PACKET_SIZE)

    @property
    def topic_alias_maximum(self) -> int | None:
        return self._int(_P.TOPIC_ALIAS_MAXIMUM)

    @property
    def reason_string(self) -> str | None:
        return self._str(_P.REASON_STRING)

    @property
    def authentication_method(self) -> str | None:
        return self._str(_P.AUTHENTICATION_METHOD)


EMPTY_PROPERTIES: Final = Properties()
_EMPTY_BLOCK: Final = b"\x00"


def read_properties(mv: memoryview, pos: int, end: int, context: int) -> tuple[Properties, int]:
    """Read a property block (length + properties) at ``pos``."""
    if pos < end and mv[pos] == 0:
        return EMPTY_PROPERTIES, pos + 1
    length, pos = _wire.read_varint(mv, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("property length beyond the packet")
    items: list[tuple[PropertyId, PropertyValue]] = []
    seen = 0
    while pos < stop:
        byte = mv[pos]
        entry = _BY_BYTE[byte]
        if entry is None:
            raise MalformedPacket(f"unknown property identifier 0x{byte:02X}")
        pid, ptype, contexts, repeatable, rule = entry
        if context not in contexts:
            raise MalformedPacket(f"property {pid.name} not allowed here")
        bit = 1 << byte
        if seen & bit and context not in repeatable:
            raise MalformedPacket(f"property {pid.name} more than once", PROTOCOL_ERROR)
        seen |= bit
        pos += 1
        value: PropertyValue
        if ptype == _UTF8:
            value, pos = _wire.read_utf8(mv, pos, stop)
        elif ptype == _PAIR:
            key, pos = _wire.read_utf8(mv, pos, stop)
            val, pos = _wire.read_utf8(mv, pos, stop)
            value = (key, val)
        elif ptype == _U32:
            value, pos = _wire.read_u32(mv, pos, stop)
        elif ptype == _U16:
            value, pos = _wire.read_u16(mv, pos, stop)
        elif ptype == _BYTE:
            if pos >= stop:
                raise MalformedPacket("truncated property")
            value = mv[pos]
            pos += 1
        elif ptype == _VARINT:
            value, pos = _wire.read_varint(mv, pos, stop)
        else:
            value, pos = _wire.read_binary(mv, pos, stop)
        if rule:
            _check_value(pid, rule, value)
        items.append((pid, value))
    return Properties(tuple(items)), pos


def _check_value(pid: PropertyId, rule: int, value: PropertyValue) -> None:
    """The value rules of section 3 whose breach is a Protocol Error."""
    if rule == _RULE_BOOLEAN:
        if value != 0 and value != 1:
            raise MalformedPacket(f"property {pid.name} must be 0 or 1", PROTOCOL_ERROR)
    elif rule == _RULE_NON_ZERO:
        if value == 0:
            raise MalformedPacket(f"property {pid.name} must not be 0", PROTOCOL_ERROR)
    elif rule == _RULE_TOPIC and (
        not isinstance(value, str) or not value or "+" in value or "#" in value
    ):
        raise MalformedPacket(f"property {pid.name} must be a valid topic name", PROTOCOL_ERROR)


def write_properties(props: Properties, context: int) -> bytes:
    """Encode a property block (length + properties)."""
    if not props.items:
        return _EMPTY_BLOCK
    out: list[bytes] = []
    seen = 0
    for key, value in props.items:
        entry = _BY_BYTE[key] if 0 <= key < 256 else None
        if entry is None:
            raise MalformedPacket(f"unknown property identifier {key}")
        pid, ptype, contexts, repeatable, rule = entry
        if context not in contexts:
            raise MalformedPacket(f"property {pid.name} not allowed here")
        bit = 1 << pid
        if seen & bit and context not in repeatable:
            raise MalformedPacket(f"property {pid.name} more than once", PROTOCOL_ERROR)
        seen |= bit
        out.append(bytes((pid,)))
        out.append(_write_value(pid, ptype, value))
        if rule:
            _check_value(pid, rule, value)
    body = b"".join(out)
    return _wire.varint(len(body)) + body


def _write_value(pid: PropertyId, ptype: int, value: PropertyValue) -> bytes:
    if ptype == _UTF8:
        if isinstance(value, str):
            return _wire.utf8(value)
    elif ptype == _BINARY:
        if isinstance(value, bytes):
            return _wire.binary(value)
    elif ptype == _PAIR:
        if (
            isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[0], str)
            and isinstance(value[1], str)
        ):
            return _wire.utf8(value[0]) + _wire.utf8(value[1])
    elif isinstance(value, int) and not isinstance(value, bool):
        if ptype == _BYTE:
            if 0 <= value <= 0xFF:
                return bytes((value,))
            raise MalformedPacket(f"property {pid.name} out of range: {value}")
        if ptype == _U16:
            return _wire.u16(value)
        if ptype == _U32:
            return _wire.u32(value)
        return _wire.varint(value)
    raise MalformedPacket(f"property {pid.name}: wrong value type {type(value).__name__}")
