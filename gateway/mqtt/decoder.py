"""Decoding: bytes in, one packet (and the bytes it used) out.

Invariants (h11 style):

* Pure: no I/O, no state between calls. ``decode`` returns
  ``(packet, consumed)`` or ``NEED_DATA``, or raises ``MalformedPacket``;
  any other exception on any input is a bug (the fuzz tests check this).
* A strict prefix of a valid packet gives ``NEED_DATA``; bytes after the
  packet are never read, so trailing data changes nothing.
* The first byte is checked as soon as it arrives (reserved packet types
  and flags, PUBLISH QoS 3, DUP on QoS 0), the size limit as soon as the
  fixed header is complete, the body once it is complete.
* A body must be used up exactly: bytes left over are malformed.
* Zero copy for PUBLISH: ``Publish.payload`` is a read-only memoryview
  slice of the caller's buffer. It keeps that buffer alive, and a
  ``bytearray`` cannot be resized while such a view exists (BufferError):
  decode from ``bytes``, or drop the packet / ``bytes(payload)`` before
  resizing. Every other field is copied into ``str``/``bytes``/``int``.
* Topic Alias, Receive Maximum, enhanced authentication, sessions: the
  session layer's business. The codec checks syntax and the value rules
  that the spec attaches to single fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Final

from gateway.mqtt import properties as _props
from gateway.mqtt._wire import decode_utf8, read_binary, read_utf8
from gateway.mqtt.errors import (
    PROTOCOL_ERROR,
    InvalidTopic,
    MalformedPacket,
    UnsupportedProtocolVersion,
)
from gateway.mqtt.framing import NEED_DATA, NeedData, split_frame, too_large
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
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from gateway.mqtt.properties import EMPTY_PROPERTIES, Properties, read_properties
from gateway.mqtt.topics import parse_shared, validate_topic_filter

__all__ = ["decode"]

_V3_CONNACK_CODES: Final = range(6)
_V3_SUBACK_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80})

_Decoder = Callable[[memoryview, int, int, int, int], Packet]


def decode(
    buf: bytes | bytearray | memoryview, *, version: int, max_packet_size: int | None = None
) -> tuple[Packet, int] | NeedData:
    """Decode the packet at the start of ``buf``.

    Args:
        buf: The bytes received so far.
        version: The session's protocol level, 4 (MQTT 3.1.1) or 5. A CONNECT
            is decoded by its own protocol level (``Connect.protocol_level``),
            which is how the session learns its version.
        max_packet_size: Refuse (0x95) a packet larger than this, in total bytes.

    Returns:
        ``(packet, bytes_consumed)``, or ``NEED_DATA`` when ``buf`` holds only
        a prefix of a packet.

    Raises:
        MalformedPacket: The bytes are not a valid packet (see its
            ``v5_reason_code``). ``UnsupportedProtocolVersion`` (a subclass)
            for a CONNECT of another protocol level.
        ValueError: ``version`` is neither 4 nor 5 (a programming error).
    """
    if version != MQTT_5 and version != MQTT_3_1_1:
        raise ValueError(f"unsupported MQTT version {version!r}")
    if type(buf) is bytes:
        mv = memoryview(buf)
    else:
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        elif not mv.readonly:
            mv = mv.toreadonly()
    n = len(mv)
    if not n:
        return NEED_DATA
    first = mv[0]
    packet_type = first >> 4
    flags = first & 0x0F
    if packet_type == 3:
        if flags & 0x06 == 0x06:
            raise MalformedPacket("PUBLISH with QoS 3")
        if flags & 0x0E == 0x08:
            raise MalformedPacket("PUBLISH with DUP set on QoS 0")
    elif packet_type == 0 or (packet_type == 15 and version == MQTT_3_1_1):
        raise MalformedPacket(f"reserved packet type {packet_type}")
    elif flags != REQUIRED_FLAGS[packet_type]:
        raise MalformedPacket(f"reserved flags 0x{flags:X} on packet type {packet_type}")
    if n > 1 and mv[1] < 0x80:  # the common short packet: split_frame inlined
        header_len = 2
        total = 2 + mv[1]
        if max_packet_size is not None and total > max_packet_size:
            raise too_large(total, max_packet_size)
    else:
        frame = split_frame(mv, max_packet_size)
        if frame is NEED_DATA:
            return NEED_DATA
        header_len, total = frame[2], frame[3]
    if n < total:
        return NEED_DATA
    return _DECODERS[packet_type](mv, header_len, total, flags, version), total


def _no_trailing(pos: int, end: int) -> None:
    if pos != end:
        raise MalformedPacket("unexpected bytes at the end of the packet")


def _packet_id(mv: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise MalformedPacket("truncated packet identifier")
    packet_id = (mv[pos] << 8) | mv[pos + 1]
    if not packet_id:
        raise MalformedPacket("packet identifier 0")
    return packet_id, pos + 2


def _connect(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    name, pos = read_utf8(mv, pos, end)
    if pos >= end:
        raise MalformedPacket("truncated CONNECT")
    level = mv[pos]
    if name != "MQTT":
        if name == "MQIsdp":
            raise UnsupportedProtocolVersion(name, level)
        raise MalformedPacket(f"unknown protocol name {name!r}")
    if level != MQTT_3_1_1 and level != MQTT_5:
        raise UnsupportedProtocolVersion(name, level)
    if pos + 4 > end:
        raise MalformedPacket("truncated CONNECT")
    connect_flags = mv[pos + 1]
    keepalive = (mv[pos + 2] << 8) | mv[pos + 3]
    pos += 4
    if connect_flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")
    will_flag = connect_flags & 0x04
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = connect_flags & 0x20
    if will_flag:
        if will_qos == 3:
            raise MalformedPacket("Will QoS 3")
    elif will_qos or will_retain:
        raise MalformedPacket("Will QoS or Will Retain set without the Will Flag")
    has_username = connect_flags & 0x80
    has_password = connect_flags & 0x40
    if has_password and not has_username and level == MQTT_3_1_1:
        raise MalformedPacket("password without user name")
    properties = EMPTY_PROPERTIES
    if level == MQTT_5:
        properties, pos = read_properties(mv, pos, end, _props.CONNECT)
    client_id, pos = read_utf8(mv, pos, end)
    will = None
    if will_flag:
        will_properties = EMPTY_PROPERTIES
        if level == MQTT_5:
            will_properties, pos = read_properties(mv, pos, end, _props.WILL)
        will_topic, pos = read_utf8(mv, pos, end)
        _check_topic_name(will_topic)
        will_payload, pos = read_binary(mv, pos, end)
        will = Will(
            topic=will_topic,
            payload=will_payload,
            qos=will_qos,
            retain=bool(will_retain),
            properties=will_properties,
        )
    username = None
    if has_username:
        username, pos = read_utf8(mv, pos, end)
    password = None
    if has_password:
        password, pos = read_binary(mv, pos, end)
    _no_trailing(pos, end)
    return Connect(
        protocol_level=level,
        client_id=client_id,
        clean_start=bool(connect_flags & 0x02),
        keepalive=keepalive,
        username=username,
        password=password,
        will=will,
        properties=properties,
    )


def _check_topic_name(topic: str) -> None:
    # Decoded strings are already valid UTF-8, short enough and without U+0000.
    if not topic:
        raise MalformedPacket("empty topic name")
    if "+" in topic or "#" in topic:
        raise MalformedPacket(f"wildcard in topic name {topic!r}")


def _connack(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    if end - pos < (3 if version == MQTT_5 else 2):
        raise MalformedPacket("truncated CONNACK")
    ack_flags = mv[pos]
    reason_code = mv[pos + 1]
    if ack_flags & 0xFE:
        raise MalformedPacket("CONNACK reserved flags set")
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, pos = read_properties(mv, pos + 2, end, _props.CONNACK)
    else:
        if reason_code not in _V3_CONNACK_CODES:
            raise MalformedPacket(f"reserved CONNACK return code {reason_code}")
        pos += 2
    _no_trailing(pos, end)
    return Connack(session_present=bool(ack_flags), reason_code=reason_code, properties=properties)


# Publish is built without its frozen-dataclass __init__ (one object.__setattr__
# per field, twice the cost): same fields, same values, by the slot descriptors.
_PUBLISH_FIELDS: Final = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")
if tuple(f.name for f in fields(Publish)) != _PUBLISH_FIELDS:  # pragma: no cover
    raise ImportError("Publish changed: update the decoder's fast constructor")
(
    _set_topic,
    _set_payload,
    _set_qos,
    _set_retain,
    _set_dup,
    _set_packet_id,
    _set_properties,
) = (Publish.__dict__[name].__set__ for name in _PUBLISH_FIELDS)


def _publish(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    # The hot path: reads inlined.
    if pos + 2 > end:
        raise MalformedPacket("truncated PUBLISH")
    stop = pos + 2 + ((mv[pos] << 8) | mv[pos + 1])
    if stop > end:
        raise MalformedPacket("truncated topic name")
    topic = decode_utf8(mv[pos + 2 : stop])
    pos = stop
    qos = (flags >> 1) & 0x03
    packet_id = None
    if qos:
        if pos + 2 > end:
            raise MalformedPacket("truncated packet identifier")
        packet_id = (mv[pos] << 8) | mv[pos + 1]
        if not packet_id:
            raise MalformedPacket("packet identifier 0")
        pos += 2
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        if pos < end and not mv[pos]:
            pos += 1
        else:
            properties, pos = read_properties(mv, pos, end, _props.PUBLISH)
    if not topic:
        if version == MQTT_3_1_1:
            raise MalformedPacket("empty topic name")
        if properties.topic_alias is None:
            raise MalformedPacket("empty topic name without a Topic Alias", PROTOCOL_ERROR)
    elif "+" in topic or "#" in topic:
        raise MalformedPacket(f"wildcard in topic name {topic!r}")
    packet = object.__new__(Publish)
    _set_topic(packet, topic)
    _set_payload(packet, mv[pos:end])
    _set_qos(packet, qos)
    _set_retain(packet, flags & 0x01 != 0)
    _set_dup(packet, flags & 0x08 != 0)
    _set_packet_id(packet, packet_id)
    _set_properties(packet, properties)
    return packet


def _publish_response(
    cls: type[Puback | Pubrec | Pubrel | Pubcomp],
) -> _Decoder:
    context = cls.TYPE.value

    def decode_response(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
        packet_id, pos = _packet_id(mv, pos, end)
        reason_code = 0
        properties = EMPTY_PROPERTIES
        if version == MQTT_5 and pos < end:
            reason_code = mv[pos]
            pos += 1
            if pos < end:
                properties, pos = read_properties(mv, pos, end, context)
        _no_trailing(pos, end)
        return cls(packet_id=packet_id, reason_code=reason_code, properties=properties)

    return decode_response


def _subscribe(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    packet_id, pos = _packet_id(mv, pos, end)
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, pos = read_properties(mv, pos, end, _props.SUBSCRIBE)
    subscriptions = []
    while pos < end:
        topic_filter, pos = read_utf8(mv, pos, end)
        if pos >= end:
            raise MalformedPacket("truncated subscription options")
        options = mv[pos]
        pos += 1
        subscriptions.append(_subscription(topic_filter, options, version))
    if not subscriptions:
        raise MalformedPacket("SUBSCRIBE without a topic filter", PROTOCOL_ERROR)
    return Subscribe(packet_id=packet_id, subscriptions=tuple(subscriptions), properties=properties)


def _subscription(topic_filter: str, options: int, version: int) -> Subscription:
    qos = options & 0x03
    if version == MQTT_3_1_1:
        if options & 0xFC:
            raise MalformedPacket("reserved subscription option bits set")
        if qos == 3:
            raise MalformedPacket("subscription with QoS 3")
        _check_topic_filter(topic_filter, version)
        return Subscription(topic_filter=topic_filter, qos=qos)
    if options & 0xC0:
        raise MalformedPacket("reserved subscription option bits set")
    if qos == 3:
        raise MalformedPacket("subscription with QoS 3", PROTOCOL_ERROR)
    retain_handling = (options >> 4) & 0x03
    if retain_handling == 3:
        raise MalformedPacket("Retain Handling 3", PROTOCOL_ERROR)
    no_local = bool(options & 0x04)
    if _check_topic_filter(topic_filter, version) and no_local:
        raise MalformedPacket("No Local on a shared subscription", PROTOCOL_ERROR)
    return Subscription(
        topic_filter=topic_filter,
        qos=qos,
        no_local=no_local,
        retain_as_published=bool(options & 0x08),
        retain_handling=retain_handling,
    )


def _check_topic_filter(topic_filter: str, version: int) -> bool:
    """Validate; return whether it is a shared subscription (MQTT 5 only)."""
    try:
        if version == MQTT_5:
            return parse_shared(topic_filter)[0] is not None
        validate_topic_filter(topic_filter)
    except InvalidTopic as e:
        raise MalformedPacket(str(e)) from None
    return False


def _suback(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    packet_id, pos = _packet_id(mv, pos, end)
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, pos = read_properties(mv, pos, end, _props.SUBACK)
    codes = tuple(mv[pos:end])
    if not codes:
        raise MalformedPacket("SUBACK without a return code", PROTOCOL_ERROR)
    if version == MQTT_3_1_1 and not _V3_SUBACK_CODES.issuperset(codes):
        raise MalformedPacket("reserved SUBACK return code")
    return Suback(packet_id=packet_id, reason_codes=codes, properties=properties)


def _unsubscribe(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    packet_id, pos = _packet_id(mv, pos, end)
    properties = EMPTY_PROPERTIES
    if version == MQTT_5:
        properties, pos = read_properties(mv, pos, end, _props.UNSUBSCRIBE)
    topic_filters = []
    while pos < end:
        topic_filter, pos = read_utf8(mv, pos, end)
        _check_topic_filter(topic_filter, version)
        topic_filters.append(topic_filter)
    if not topic_filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter", PROTOCOL_ERROR)
    return Unsubscribe(
        packet_id=packet_id, topic_filters=tuple(topic_filters), properties=properties
    )


def _unsuback(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
    packet_id, pos = _packet_id(mv, pos, end)
    if version == MQTT_3_1_1:
        _no_trailing(pos, end)
        return Unsuback(packet_id=packet_id)
    properties, pos = read_properties(mv, pos, end, _props.UNSUBACK)
    codes = tuple(mv[pos:end])
    if not codes:
        raise MalformedPacket("UNSUBACK without a reason code", PROTOCOL_ERROR)
    return Unsuback(packet_id=packet_id, reason_codes=codes, properties=properties)


def _empty(packet: Pingreq | Pingresp) -> _Decoder:
    def decode_empty(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
        _no_trailing(pos, end)
        return packet

    return decode_empty


def _reason_and_properties(
    cls: type[Disconnect | Auth], context: int, short_form: bool
) -> _Decoder:
    """DISCONNECT and AUTH on MQTT 5: optional reason code, then properties.

    ``short_form``: a reason code without a property length is allowed
    (DISCONNECT) or not (AUTH).
    """
    default = cls()

    def decode_reason(mv: memoryview, pos: int, end: int, flags: int, version: int) -> Packet:
        if pos == end:
            return default
        if version == MQTT_3_1_1:
            raise MalformedPacket("DISCONNECT with a body on MQTT 3.1.1")
        reason_code = mv[pos]
        pos += 1
        properties: Properties = EMPTY_PROPERTIES
        if pos < end or not short_form:
            properties, pos = read_properties(mv, pos, end, context)
        _no_trailing(pos, end)
        return cls(reason_code=reason_code, properties=properties)

    return decode_reason


_DECODERS: Final[tuple[_Decoder, ...]] = (
    _connect,  # 0: never called, refused with the first byte
    _connect,
    _connack,
    _publish,
    _publish_response(Puback),
    _publish_response(Pubrec),
    _publish_response(Pubrel),
    _publish_response(Pubcomp),
    _subscribe,
    _suback,
    _unsubscribe,
    _unsuback,
    _empty(Pingreq()),
    _empty(Pingresp()),
    _reason_and_properties(Disconnect, _props.DISCONNECT, short_form=True),
    _reason_and_properties(Auth, _props.AUTH, short_form=False),
)
