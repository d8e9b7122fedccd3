"""Encoding: one packet in, its bytes out.

Invariants:

* The exact inverse of decoding: ``decode(encode(p, version=v), version=v)
  == (p, len(encode(p, version=v)))`` for every packet ``p`` that ``encode``
  accepts. So ``encode`` refuses (``MalformedPacket``) whatever ``decode``
  would refuse: a QoS 3, a packet identifier 0, an invalid topic, an MQTT 5
  field on MQTT 3.1.1, a property not allowed in the packet, and so on.
* MQTT 5 optional fields take the shortest form (a PUBACK with reason code 0
  and no properties is 2 bytes of body, a DISCONNECT 0 is empty).
* A PUBLISH payload is joined once, into the output; never copied before.
* ``RawPacket`` is written as is, unchecked beyond its type and flags range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from gateway.mqtt import _wire
from gateway.mqtt import properties as _props
from gateway.mqtt.errors import InvalidTopic, MalformedPacket
from gateway.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    REQUIRED_FLAGS,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RawPacket,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from gateway.mqtt.properties import Properties, write_properties
from gateway.mqtt.topics import parse_shared, validate_topic_filter, validate_topic_name

__all__ = ["encode"]

_Parts = list[bytes | memoryview]
_Encoder = Callable[[Any, int], tuple[int, _Parts]]
_V3_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})


def encode(packet: Packet, *, version: int) -> bytes:
    """Encode ``packet`` for a session of protocol level ``version`` (4 or 5).

    Raises:
        MalformedPacket: The packet cannot be encoded validly for ``version``.
        ValueError: ``version`` is neither 4 nor 5.
        TypeError: ``packet`` is not a packet.
    """
    if version != MQTT_5 and version != MQTT_3_1_1:
        raise ValueError(f"unsupported MQTT version {version!r}")
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    first, parts = encoder(packet, version)
    length = 0
    for part in parts:
        length += len(part)
    return b"".join([bytes((first,)), _wire.varint(length), *parts])


def _packet_id(packet_id: int) -> bytes:
    if not 1 <= packet_id <= 0xFFFF:
        raise MalformedPacket(f"packet identifier out of range: {packet_id}")
    return packet_id.to_bytes(2, "big")


def _byte(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFF:
        raise MalformedPacket(f"{what} out of range: {value}")
    return bytes((value,))


def _qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise MalformedPacket(f"invalid QoS {qos}")
    return qos


def _properties(properties: Properties, context: int, version: int) -> list[bytes]:
    if version == MQTT_5:
        return [write_properties(properties, context)]
    if properties:
        raise MalformedPacket("properties on MQTT 3.1.1")
    return []


def _v5_only(condition: object, what: str, version: int) -> None:
    if condition and version == MQTT_3_1_1:
        raise MalformedPacket(f"{what} on MQTT 3.1.1")


def _topic_name(topic: str) -> None:
    try:
        validate_topic_name(topic)
    except InvalidTopic as e:
        raise MalformedPacket(str(e)) from None


def _topic_filter(topic_filter: str, version: int) -> bool:
    try:
        if version == MQTT_5:
            return parse_shared(topic_filter)[0] is not None
        validate_topic_filter(topic_filter)
    except InvalidTopic as e:
        raise MalformedPacket(str(e)) from None
    return False


def _connect(p: Connect, version: int) -> tuple[int, _Parts]:
    if p.protocol_level != version:
        raise MalformedPacket(f"CONNECT protocol level {p.protocol_level} on version {version}")
    flags = 0x02 if p.clean_start else 0
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        if p.username is None and version == MQTT_3_1_1:
            raise MalformedPacket("password without user name on MQTT 3.1.1")
        flags |= 0x40
    parts: _Parts = [b"\x00\x04MQTT", bytes((version,)), b"", _wire.u16(p.keepalive)]
    parts += _properties(p.properties, _props.CONNECT, version)
    parts.append(_wire.utf8(p.client_id))
    if p.will is not None:
        will = p.will
        flags |= 0x04 | (_qos(will.qos) << 3) | (0x20 if will.retain else 0)
        parts += _properties(will.properties, _props.WILL, version)
        _topic_name(will.topic)
        parts += (_wire.utf8(will.topic), _wire.binary(will.payload))
    if p.username is not None:
        parts.append(_wire.utf8(p.username))
    if p.password is not None:
        parts.append(_wire.binary(p.password))
    parts[2] = bytes((flags,))
    return 0x10, parts


def _connack(p: Connack, version: int) -> tuple[int, _Parts]:
    if version == MQTT_3_1_1 and not 0 <= p.reason_code <= 5:
        raise MalformedPacket(f"reserved CONNACK return code {p.reason_code}")
    parts: _Parts = [b"\x01" if p.session_present else b"\x00", _byte(p.reason_code, "reason code")]
    parts += _properties(p.properties, _props.CONNACK, version)
    return 0x20, parts


def _publish(p: Publish, version: int) -> tuple[int, _Parts]:
    qos = _qos(p.qos)
    if p.topic or version == MQTT_3_1_1 or p.properties.topic_alias is None:
        _topic_name(p.topic)
    parts: _Parts = [_wire.utf8(p.topic)]
    if qos:
        if p.packet_id is None:
            raise MalformedPacket("PUBLISH with QoS > 0 needs a packet identifier")
        parts.append(_packet_id(p.packet_id))
    elif p.packet_id is not None:
        raise MalformedPacket("PUBLISH with QoS 0 has no packet identifier")
    elif p.dup:
        raise MalformedPacket("PUBLISH with DUP set on QoS 0")
    parts += _properties(p.properties, _props.PUBLISH, version)
    parts.append(p.payload)
    return 0x30 | (0x08 if p.dup else 0) | (qos << 1) | (0x01 if p.retain else 0), parts


def _publish_response(p: Puback | Pubrec | Pubrel | Pubcomp, version: int) -> tuple[int, _Parts]:
    parts: _Parts = [_packet_id(p.packet_id)]
    _v5_only(p.reason_code, "reason code", version)
    if p.properties:
        parts += _properties(p.properties, p.TYPE.value, version)
        parts.insert(1, _byte(p.reason_code, "reason code"))
    elif p.reason_code:
        parts.append(_byte(p.reason_code, "reason code"))
    return (p.TYPE.value << 4) | REQUIRED_FLAGS[p.TYPE.value], parts


def _subscribe(p: Subscribe, version: int) -> tuple[int, _Parts]:
    parts: _Parts = [_packet_id(p.packet_id)]
    parts += _properties(p.properties, _props.SUBSCRIBE, version)
    if not p.subscriptions:
        raise MalformedPacket("SUBSCRIBE without a topic filter")
    for s in p.subscriptions:
        shared = _topic_filter(s.topic_filter, version)
        options = _qos(s.qos)
        if s.no_local or s.retain_as_published or s.retain_handling:
            _v5_only(True, "subscription options other than QoS", version)
            if shared and s.no_local:
                raise MalformedPacket("No Local on a shared subscription")
            if s.retain_handling not in (0, 1, 2):
                raise MalformedPacket(f"invalid Retain Handling {s.retain_handling}")
            options |= (
                (0x04 if s.no_local else 0)
                | (0x08 if s.retain_as_published else 0)
                | (s.retain_handling << 4)
            )
        parts += (_wire.utf8(s.topic_filter), bytes((options,)))
    return 0x82, parts


def _suback(p: Suback, version: int) -> tuple[int, _Parts]:
    parts: _Parts = [_packet_id(p.packet_id)]
    parts += _properties(p.properties, _props.SUBACK, version)
    if not p.reason_codes:
        raise MalformedPacket("SUBACK without a return code")
    if version == MQTT_3_1_1 and not _V3_SUBACK_CODES.issuperset(p.reason_codes):
        raise MalformedPacket("reserved SUBACK return code on MQTT 3.1.1")
    parts.append(b"".join(_byte(code, "reason code") for code in p.reason_codes))
    return 0x90, parts


def _unsubscribe(p: Unsubscribe, version: int) -> tuple[int, _Parts]:
    parts: _Parts = [_packet_id(p.packet_id)]
    parts += _properties(p.properties, _props.UNSUBSCRIBE, version)
    if not p.topic_filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")
    for topic_filter in p.topic_filters:
        _topic_filter(topic_filter, version)
        parts.append(_wire.utf8(topic_filter))
    return 0xA2, parts


def _unsuback(p: Unsuback, version: int) -> tuple[int, _Parts]:
    parts: _Parts = [_packet_id(p.packet_id)]
    if version == MQTT_3_1_1:
        _v5_only(p.reason_codes, "UNSUBACK reason codes", version)
        _v5_only(p.properties, "properties", version)
        return 0xB0, parts
    if not p.reason_codes:
        raise MalformedPacket("UNSUBACK without a reason code on MQTT 5")
    parts.append(write_properties(p.properties, _props.UNSUBACK))
    parts.append(b"".join(_byte(code, "reason code") for code in p.reason_codes))
    return 0xB0, parts


def _empty(p: Pingreq | Pingresp, version: int) -> tuple[int, _Parts]:
    return p.TYPE.value << 4, []


def _disconnect(p: Disconnect | Auth, version: int) -> tuple[int, _Parts]:
    if isinstance(p, Auth) and version == MQTT_3_1_1:
        raise MalformedPacket("AUTH on MQTT 3.1.1")
    _v5_only(p.reason_code or p.properties, "reason code or properties", version)
    parts: _Parts = []
    if p.properties or (p.reason_code and isinstance(p, Auth)):
        parts.append(_byte(p.reason_code, "reason code"))
        parts += _properties(p.properties, p.TYPE.value, version)
    elif p.reason_code:
        parts.append(_byte(p.reason_code, "reason code"))
    return p.TYPE.value << 4, parts


def _raw(p: RawPacket, version: int) -> tuple[int, _Parts]:
    if not 0 <= p.packet_type <= 15 or not 0 <= p.flags <= 15:
        raise MalformedPacket("packet type and flags must be 4-bit values")
    return (p.packet_type << 4) | p.flags, [p.body]


_ENCODERS: Final[dict[type, _Encoder]] = {
    Connect: _connect,
    Connack: _connack,
    Publish: _publish,
    Puback: _publish_response,
    Pubrec: _publish_response,
    Pubrel: _publish_response,
    Pubcomp: _publish_response,
    Subscribe: _subscribe,
    Suback: _suback,
    Unsubscribe: _unsubscribe,
    Unsuback: _unsuback,
    Pingreq: _empty,
    Pingresp: _empty,
    Disconnect: _disconnect,
    Auth: _disconnect,
    RawPacket: _raw,
}
