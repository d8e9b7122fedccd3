"""The encoder refuses what the decoder would refuse: it never writes an invalid packet."""

from __future__ import annotations

import pytest

from gateway.mqtt import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    Packet,
    Properties,
    PropertyId,
    Puback,
    Publish,
    Pubrel,
    RawPacket,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    _wire,
    encode,
)

P = PropertyId
ALIAS = Properties.of((P.TOPIC_ALIAS, 1))
USER = Properties.of((P.USER_PROPERTY, ("k", "v")))


def sub(topic_filter: str = "a", **options: int | bool) -> Subscribe:
    return Subscribe(
        packet_id=1,
        subscriptions=(Subscription(topic_filter=topic_filter, **options),),  # type: ignore[arg-type]
    )


INVALID: list[tuple[str, int, Packet]] = [
    # PUBLISH
    ("qos-3", 4, Publish(topic="t", qos=3, packet_id=1)),
    ("qos-negative", 5, Publish(topic="t", qos=-1)),
    ("packet-id-0", 4, Publish(topic="t", qos=1, packet_id=0)),
    ("packet-id-65536", 5, Publish(topic="t", qos=2, packet_id=65536)),
    ("qos1-without-packet-id", 4, Publish(topic="t", qos=1)),
    ("qos0-with-packet-id", 4, Publish(topic="t", packet_id=1)),
    ("dup-on-qos0", 5, Publish(topic="t", dup=True)),
    ("wildcard-topic", 4, Publish(topic="a/+")),
    ("hash-topic", 5, Publish(topic="#")),
    ("empty-topic-v3", 4, Publish(topic="")),
    ("empty-topic-v5-without-alias", 5, Publish(topic="")),
    ("nul-topic", 4, Publish(topic="a\x00")),
    ("surrogate-topic", 5, Publish(topic="\udc00")),
    ("properties-on-v3", 4, Publish(topic="t", properties=USER)),
    ("alias-on-v3", 4, Publish(topic="", properties=ALIAS)),
    # CONNECT
    ("level-mismatch", 4, Connect(protocol_level=5, client_id="c")),
    ("level-3", 4, Connect(protocol_level=3, client_id="c")),
    (
        "will-qos-3",
        4,
        Connect(protocol_level=4, client_id="c", will=Will(topic="w", payload=b"", qos=3)),
    ),
    (
        "will-topic-wildcard",
        5,
        Connect(protocol_level=5, client_id="c", will=Will(topic="w/#", payload=b"")),
    ),
    (
        "will-properties-on-v3",
        4,
        Connect(
            protocol_level=4, client_id="c", will=Will(topic="w", payload=b"", properties=USER)
        ),
    ),
    (
        "will-property-wrong-place",
        5,
        Connect(
            protocol_level=5, client_id="c", will=Will(topic="w", payload=b"", properties=ALIAS)
        ),
    ),
    ("password-without-username-v3", 4, Connect(protocol_level=4, client_id="c", password=b"p")),
    ("keepalive-too-big", 4, Connect(protocol_level=4, client_id="c", keepalive=65536)),
    ("client-id-nul", 5, Connect(protocol_level=5, client_id="\x00")),
    ("client-id-too-long", 4, Connect(protocol_level=4, client_id="x" * 65536)),
    ("password-too-long", 5, Connect(protocol_level=5, client_id="c", password=b"x" * 65536)),
    ("connect-properties-on-v3", 4, Connect(protocol_level=4, client_id="c", properties=USER)),
    # CONNACK
    ("connack-v3-code-6", 4, Connack(reason_code=6)),
    ("connack-v3-properties", 4, Connack(properties=USER)),
    ("connack-code-256", 5, Connack(reason_code=256)),
    # PUBACK family
    ("puback-reason-on-v3", 4, Puback(packet_id=1, reason_code=0x87)),
    ("puback-properties-on-v3", 4, Puback(packet_id=1, properties=USER)),
    ("puback-packet-id-0", 5, Puback(packet_id=0)),
    ("pubrel-reason-256", 5, Pubrel(packet_id=1, reason_code=256)),
    # SUBSCRIBE
    ("subscribe-empty", 4, Subscribe(packet_id=1, subscriptions=())),
    ("subscribe-packet-id-0", 4, Subscribe(packet_id=0, subscriptions=sub().subscriptions)),
    ("subscribe-qos-3", 5, sub(qos=3)),
    ("subscribe-no-local-on-v3", 4, sub(no_local=True)),
    ("subscribe-rap-on-v3", 4, sub(retain_as_published=True)),
    ("subscribe-retain-handling-on-v3", 4, sub(retain_handling=1)),
    ("subscribe-retain-handling-3", 5, sub(retain_handling=3)),
    ("subscribe-bad-filter", 4, sub("a/#/b")),
    ("subscribe-empty-filter", 5, sub("")),
    ("subscribe-bad-share", 5, sub("$share/+/a")),
    ("subscribe-shared-no-local", 5, sub("$share/g/a", no_local=True)),
    # SUBACK / UNSUBSCRIBE / UNSUBACK
    ("suback-empty", 5, Suback(packet_id=1, reason_codes=())),
    ("suback-v5-code-on-v3", 4, Suback(packet_id=1, reason_codes=(0x87,))),
    ("suback-code-256", 5, Suback(packet_id=1, reason_codes=(256,))),
    ("unsubscribe-empty", 5, Unsubscribe(packet_id=1, topic_filters=())),
    ("unsubscribe-bad-filter", 4, Unsubscribe(packet_id=1, topic_filters=("a+",))),
    ("unsuback-codes-on-v3", 4, Unsuback(packet_id=1, reason_codes=(0,))),
    ("unsuback-no-codes-on-v5", 5, Unsuback(packet_id=1)),
    # DISCONNECT / AUTH / raw
    ("disconnect-reason-on-v3", 4, Disconnect(reason_code=0x98)),
    ("disconnect-properties-on-v3", 4, Disconnect(properties=USER)),
    ("disconnect-reason-256", 5, Disconnect(reason_code=256)),
    ("auth-on-v3", 4, Auth()),
    ("raw-type-16", 5, RawPacket(packet_type=16, flags=0)),
    ("raw-flags-16", 5, RawPacket(packet_type=3, flags=16)),
]


@pytest.mark.parametrize(
    ("version", "packet"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_encode_refuses(version: int, packet: Packet) -> None:
    with pytest.raises(MalformedPacket):
        encode(packet, version=version)


def test_encode_refuses_a_non_packet() -> None:
    with pytest.raises(TypeError, match="not an MQTT packet"):
        encode("PUBLISH", version=4)  # type: ignore[arg-type]


def test_remaining_length_limit() -> None:
    assert _wire.varint(268_435_455) == b"\xff\xff\xff\x7f"
    with pytest.raises(MalformedPacket, match="out of range"):
        _wire.varint(268_435_456)
    with pytest.raises(MalformedPacket, match="out of range"):
        _wire.varint(-1)


def test_unsuback_on_v5_needs_reason_codes_but_v3_has_none() -> None:
    assert encode(Unsuback(packet_id=1), version=4) == b"\xb0\x02\x00\x01"
    assert (
        encode(Unsuback(packet_id=1, reason_codes=(0,)), version=5) == b"\xb0\x04\x00\x01\x00\x00"
    )
