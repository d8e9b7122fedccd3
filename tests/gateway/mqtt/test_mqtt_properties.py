"""MQTT 5 properties: the table against the spec, the value type, the wire form."""

from __future__ import annotations

import pytest

from gateway.mqtt import (
    NEED_DATA,
    Disconnect,
    MalformedPacket,
    Properties,
    PropertyId,
    PropertyValue,
    Publish,
    decode,
    encode,
)
from gateway.mqtt import properties as codec_properties

from .strategies import NOT_ZERO, SPEC_PROPERTIES, WILL, ZERO_OR_ONE

P = PropertyId
_TYPE_NAMES = {"BYTE": "byte", "U16": "u16", "U32": "u32", "VARINT": "varint", "UTF8": "utf8"}
_TYPE_NAMES |= {"BINARY": "binary", "PAIR": "pair"}
_CONTEXT_NAMES = {codec_properties.WILL: WILL} | {
    getattr(codec_properties, name): name
    for name in [
        "CONNECT",
        "CONNACK",
        "PUBLISH",
        "PUBACK",
        "PUBREC",
        "PUBREL",
        "PUBCOMP",
        "SUBSCRIBE",
        "SUBACK",
        "UNSUBSCRIBE",
        "UNSUBACK",
        "DISCONNECT",
        "AUTH",
    ]
}


def test_property_table_matches_the_specification() -> None:
    codec_table = {
        int(pid): (_TYPE_NAMES[ptype.name], frozenset(_CONTEXT_NAMES[c] for c in contexts))
        for pid, (ptype, contexts) in codec_properties.SPEC.items()
    }
    assert codec_table == SPEC_PROPERTIES
    assert set(codec_properties.BOOLEAN_BYTES) == ZERO_OR_ONE
    assert set(codec_properties.NON_ZERO) == NOT_ZERO
    assert {int(p) for p in PropertyId} == set(SPEC_PROPERTIES)


def _disconnect_round_trip(props: Properties) -> Properties:
    raw = encode(Disconnect(reason_code=0x04, properties=props), version=5)
    result = decode(raw, version=5)
    assert result is not NEED_DATA
    packet = result[0]
    assert isinstance(packet, Disconnect)
    return packet.properties


def _publish_round_trip(props: Properties) -> Properties:
    raw = encode(Publish(topic="t", properties=props), version=5)
    result = decode(raw, version=5)
    assert result is not NEED_DATA
    packet = result[0]
    assert isinstance(packet, Publish)
    return packet.properties


@pytest.mark.parametrize(
    "items",
    [
        [(P.SESSION_EXPIRY_INTERVAL, 0)],
        [(P.SESSION_EXPIRY_INTERVAL, 0xFFFF_FFFF)],
        [(P.REASON_STRING, "")],
        [(P.REASON_STRING, "é\U0001f600" * 100)],
        [(P.SERVER_REFERENCE, "other"), (P.USER_PROPERTY, ("", ""))],
        [
            (P.USER_PROPERTY, ("a", "1")),
            (P.SESSION_EXPIRY_INTERVAL, 5),
            (P.USER_PROPERTY, ("a", "2")),
        ],
    ],
)
def test_disconnect_properties_round_trip_in_order(items: list[tuple[int, PropertyValue]]) -> None:
    props = Properties.of(*items)
    assert _disconnect_round_trip(props) == props


@pytest.mark.parametrize(
    "items",
    [
        [(P.SUBSCRIPTION_IDENTIFIER, 1)],
        [(P.SUBSCRIPTION_IDENTIFIER, 268_435_455)],
        [(P.SUBSCRIPTION_IDENTIFIER, 128), (P.SUBSCRIPTION_IDENTIFIER, 16_384)],
        [(P.CORRELATION_DATA, b"")],
        [(P.CORRELATION_DATA, bytes(range(256)) * 4)],
        [(P.TOPIC_ALIAS, 0xFFFF), (P.PAYLOAD_FORMAT_INDICATOR, 0)],
        [(P.TOPIC_ALIAS, 0)],  # alias semantics (0 is invalid) belong to the session
        [(P.RESPONSE_TOPIC, "reply/to/me"), (P.CONTENT_TYPE, "application/json")],
        [(P.MESSAGE_EXPIRY_INTERVAL, 1)],
    ],
)
def test_publish_properties_round_trip(items: list[tuple[int, PropertyValue]]) -> None:
    props = Properties.of(*items)
    assert _publish_round_trip(props) == props


def test_accessors() -> None:
    props = Properties.of(
        (P.USER_PROPERTY, ("k", "v")),
        (P.TOPIC_ALIAS, 3),
        (P.SUBSCRIPTION_IDENTIFIER, 7),
        (P.USER_PROPERTY, ("k", "w")),
        (P.SUBSCRIPTION_IDENTIFIER, 9),
    )
    assert props
    assert not Properties()
    assert props.topic_alias == 3
    assert props.user_properties == (("k", "v"), ("k", "w"))
    assert props.subscription_identifiers == (7, 9)
    assert props.get(P.SUBSCRIPTION_IDENTIFIER) == 7
    assert props.get_all(P.SUBSCRIPTION_IDENTIFIER) == (7, 9)
    assert props.get(P.REASON_STRING) is None
    assert props.reason_string is None
    assert props.session_expiry_interval is None
    connect_props = Properties.of(
        (P.SESSION_EXPIRY_INTERVAL, 60),
        (P.RECEIVE_MAXIMUM, 10),
        (P.MAXIMUM_PACKET_SIZE, 1024),
        (P.TOPIC_ALIAS_MAXIMUM, 5),
        (P.AUTHENTICATION_METHOD, "m"),
    )
    assert connect_props.session_expiry_interval == 60
    assert connect_props.receive_maximum == 10
    assert connect_props.maximum_packet_size == 1024
    assert connect_props.topic_alias_maximum == 5
    assert connect_props.authentication_method == "m"
    assert Properties.of((P.REASON_STRING, "r")).reason_string == "r"


def test_plain_int_ids_are_equal_to_enum_ids() -> None:
    assert Properties.of((0x23, 3)) == Properties.of((P.TOPIC_ALIAS, 3))
    assert Properties.from_iterable([(0x23, 3)]) == Properties.of((P.TOPIC_ALIAS, 3))
    assert hash(Properties.of((0x23, 3))) == hash(Properties.of((P.TOPIC_ALIAS, 3)))


def test_unknown_id_is_refused_when_building() -> None:
    with pytest.raises(ValueError, match="PropertyId"):
        Properties.of((0x04, 1))


@pytest.mark.parametrize(
    ("items", "code"),
    [
        ([(P.SESSION_EXPIRY_INTERVAL, "60")], 0x81),  # wrong type
        ([(P.SESSION_EXPIRY_INTERVAL, -1)], 0x81),
        ([(P.SESSION_EXPIRY_INTERVAL, 1 << 32)], 0x81),
        ([(P.SESSION_EXPIRY_INTERVAL, True)], 0x81),  # bool is not an int here
        ([(P.REASON_STRING, b"bytes")], 0x81),
        ([(P.REASON_STRING, "a\x00")], 0x81),
        ([(P.REASON_STRING, "\ud800")], 0x81),
        ([(P.REASON_STRING, "x" * 65536)], 0x81),
        ([(P.USER_PROPERTY, ("only one",))], 0x81),
        ([(P.USER_PROPERTY, ("k", 1))], 0x81),
        ([(P.TOPIC_ALIAS, 1)], 0x81),  # not allowed in DISCONNECT
        ([(P.SESSION_EXPIRY_INTERVAL, 1), (P.SESSION_EXPIRY_INTERVAL, 2)], 0x82),
    ],
)
def test_encoding_refuses_invalid_properties(
    items: list[tuple[int, PropertyValue]], code: int
) -> None:
    props = Properties(tuple((P(pid), value) for pid, value in items))
    with pytest.raises(MalformedPacket) as info:
        encode(Disconnect(properties=props), version=5)
    assert info.value.v5_reason_code == code


@pytest.mark.parametrize(
    "items",
    [
        [(P.PAYLOAD_FORMAT_INDICATOR, 2)],
        [(P.PAYLOAD_FORMAT_INDICATOR, 256)],
        [(P.SUBSCRIPTION_IDENTIFIER, 0)],
        [(P.SUBSCRIPTION_IDENTIFIER, 268_435_456)],
        [(P.TOPIC_ALIAS, 65536)],
        [(P.CORRELATION_DATA, "not bytes")],
        [(P.CORRELATION_DATA, b"x" * 65536)],
        [(P.RESPONSE_TOPIC, "a/#")],
        [(P.RESPONSE_TOPIC, "")],
        [(P.SESSION_EXPIRY_INTERVAL, 1)],  # not allowed in PUBLISH
    ],
)
def test_encoding_refuses_invalid_publish_properties(
    items: list[tuple[int, PropertyValue]],
) -> None:
    props = Properties(tuple((P(pid), value) for pid, value in items))
    with pytest.raises(MalformedPacket):
        encode(Publish(topic="t", properties=props), version=5)


def test_encoding_refuses_an_unknown_id_smuggled_in() -> None:
    props = Properties(((0x04, 1),))  # type: ignore[arg-type]
    with pytest.raises(MalformedPacket, match="unknown property"):
        encode(Disconnect(properties=props), version=5)
    props = Properties(((300, 1),))  # type: ignore[arg-type]
    with pytest.raises(MalformedPacket, match="unknown property"):
        encode(Disconnect(properties=props), version=5)
