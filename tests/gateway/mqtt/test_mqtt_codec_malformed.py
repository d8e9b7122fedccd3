"""Hand-written malformed packets: each is refused with the expected MQTT 5 reason code."""

from __future__ import annotations

import pytest

from gateway.mqtt import (
    NEED_DATA,
    Connect,
    MalformedPacket,
    Pingreq,
    Publish,
    Subscribe,
    UnsupportedProtocolVersion,
    decode,
    split_frame,
)

MALFORMED = 0x81
PROTOCOL = 0x82
TOO_LARGE = 0x95


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect(
    flags: int, payload: bytes, *, level: int = 4, name: bytes = b"MQTT", props: bytes = b""
) -> bytes:
    if level == 5 and not props:
        props = b"\x00"
    return frame(0x10, s(name) + bytes([level, flags]) + b"\x00\x3c" + props + payload)


# (id, version, bytes, v5 reason code)
CASES: list[tuple[str, int, bytes, int]] = [
    # --- fixed header ---
    ("rl-4-bytes-with-continuation", 4, b"\x30\xff\xff\xff\xff", MALFORMED),
    ("rl-5-bytes", 5, b"\x30\xff\xff\xff\xff\x01", MALFORMED),
    ("rl-not-shortest", 4, b"\xc0\x80\x00", MALFORMED),
    ("rl-not-shortest-3", 5, b"\x30\x80\x80\x00", MALFORMED),
    ("type-0", 4, b"\x00\x00", MALFORMED),
    ("type-0-v5", 5, b"\x00\x00", MALFORMED),
    ("auth-on-v3", 4, b"\xf0\x00", MALFORMED),
    ("connect-flags", 4, b"\x11" + connect(0x02, s("c"))[1:], MALFORMED),
    ("connack-flags", 4, b"\x28\x02\x00\x00", MALFORMED),
    ("puback-flags", 4, b"\x41\x02\x00\x01", MALFORMED),
    ("pubrec-flags", 5, b"\x52\x02\x00\x01", MALFORMED),
    ("pubrel-flags-0", 4, b"\x60\x02\x00\x01", MALFORMED),
    ("pubcomp-flags", 4, b"\x72\x02\x00\x01", MALFORMED),
    ("subscribe-flags-0", 4, frame(0x80, b"\x00\x01" + s("a") + b"\x00"), MALFORMED),
    ("subscribe-flags-3", 4, frame(0x83, b"\x00\x01" + s("a") + b"\x00"), MALFORMED),
    ("suback-flags", 4, b"\x92\x03\x00\x01\x00", MALFORMED),
    ("unsubscribe-flags-0", 4, frame(0xA0, b"\x00\x01" + s("a")), MALFORMED),
    ("unsuback-flags", 4, b"\xb1\x02\x00\x01", MALFORMED),
    ("pingreq-flags", 4, b"\xc1\x00", MALFORMED),
    ("pingresp-flags", 5, b"\xd8\x00", MALFORMED),
    ("disconnect-flags", 5, b"\xe1\x00", MALFORMED),
    ("auth-flags", 5, b"\xf1\x00", MALFORMED),
    # --- remaining length disagrees with the content ---
    ("puback-short", 4, b"\x40\x01\x00", MALFORMED),
    ("puback-long-v3", 4, b"\x40\x03\x00\x01\x00", MALFORMED),
    ("pingreq-body", 4, b"\xc0\x01\x00", MALFORMED),
    ("disconnect-body-v3", 4, b"\xe0\x01\x00", MALFORMED),
    ("connack-short-v3", 4, b"\x20\x01\x00", MALFORMED),
    ("connack-long-v3", 4, b"\x20\x03\x00\x00\x00", MALFORMED),
    ("connack-no-props-v5", 5, b"\x20\x02\x00\x00", MALFORMED),
    ("unsuback-long-v3", 4, b"\xb0\x03\x00\x01\x00", MALFORMED),
    ("publish-topic-past-end", 4, b"\x30\x03\x00\x05ab", MALFORMED),
    ("publish-no-packet-id", 4, b"\x32\x03\x00\x01a", MALFORMED),
    (
        "connect-string-past-end",
        4,
        frame(0x10, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x09abc"),
        MALFORMED,
    ),
    ("connect-trailing", 4, connect(0x02, s("c") + b"\x00"), MALFORMED),
    ("connect-no-level", 4, frame(0x10, s("MQTT")), MALFORMED),
    ("auth-reason-without-props", 5, b"\xf0\x01\x18", MALFORMED),
    # --- UTF-8 strings ---
    ("topic-invalid-utf8", 4, frame(0x30, s(b"\xff")), MALFORMED),
    ("topic-surrogate", 4, frame(0x30, s(b"\xed\xa0\x80")), MALFORMED),
    ("topic-overlong", 5, frame(0x30, s(b"\xc0\xaf") + b"\x00"), MALFORMED),
    ("topic-nul", 4, frame(0x30, s(b"a\x00b")), MALFORMED),
    ("topic-truncated-utf8", 4, frame(0x30, s(b"\xe2\x82")), MALFORMED),
    ("client-id-invalid-utf8", 4, connect(0x02, s(b"\x80")), MALFORMED),
    ("username-nul", 5, connect(0x82, s("c") + s(b"\x00"), level=5), MALFORMED),
    (
        "user-property-invalid-utf8",
        5,
        frame(0xE0, b"\x00" + bytes([1 + 2 + 1 + 2 + 1]) + b"\x26" + s(b"\xfe") + s("v")),
        MALFORMED,
    ),
    # --- CONNECT ---
    ("protocol-name", 4, connect(0x02, s("c"), name=b"MQTX"), MALFORMED),
    ("protocol-name-empty", 4, connect(0x02, s("c"), name=b""), MALFORMED),
    ("connect-reserved-flag", 4, connect(0x03, s("c")), MALFORMED),
    ("will-qos-3", 4, connect(0x02 | 0x04 | 0x18, s("c") + s("w") + s("x")), MALFORMED),
    ("will-qos-without-will", 4, connect(0x02 | 0x08, s("c")), MALFORMED),
    ("will-retain-without-will", 5, connect(0x02 | 0x20, s("c"), level=5), MALFORMED),
    ("password-without-username-v3", 4, connect(0x42, s("c") + s("pw")), MALFORMED),
    ("will-topic-wildcard", 4, connect(0x06, s("c") + s("w/#") + s("x")), MALFORMED),
    ("will-topic-empty", 4, connect(0x06, s("c") + s("") + s("x")), MALFORMED),
    ("username-flag-without-username", 4, connect(0x82, s("c")), MALFORMED),
    # --- PUBLISH ---
    ("empty-topic-v3", 4, frame(0x30, s("") + b"x"), MALFORMED),
    ("empty-topic-no-alias-v5", 5, frame(0x30, s("") + b"\x00x"), PROTOCOL),
    ("topic-plus", 4, frame(0x30, s("a/+") + b"x"), MALFORMED),
    ("topic-hash", 5, frame(0x30, s("a/#") + b"\x00x"), MALFORMED),
    ("topic-hash-inside-level", 4, frame(0x30, s("a#b")), MALFORMED),
    ("qos-3", 4, frame(0x36, s("a") + b"\x00\x01"), MALFORMED),
    ("qos-3-first-byte-only", 5, b"\x36", MALFORMED),
    ("dup-on-qos-0", 4, frame(0x38, s("a")), MALFORMED),
    ("publish-packet-id-0", 4, frame(0x32, s("a") + b"\x00\x00"), MALFORMED),
    ("publish-packet-id-0-qos2", 5, frame(0x34, s("a") + b"\x00\x00\x00"), MALFORMED),
    # --- packet identifiers ---
    ("puback-packet-id-0", 4, b"\x40\x02\x00\x00", MALFORMED),
    ("pubrel-packet-id-0", 5, b"\x62\x02\x00\x00", MALFORMED),
    ("subscribe-packet-id-0", 4, frame(0x82, b"\x00\x00" + s("a") + b"\x00"), MALFORMED),
    ("unsuback-packet-id-0", 5, b"\xb0\x04\x00\x00\x00\x00", MALFORMED),
    # --- SUBSCRIBE / UNSUBSCRIBE / acks ---
    ("subscribe-no-filter", 4, frame(0x82, b"\x00\x01"), PROTOCOL),
    ("subscribe-no-filter-v5", 5, frame(0x82, b"\x00\x01\x00"), PROTOCOL),
    ("subscribe-no-options", 4, frame(0x82, b"\x00\x01" + s("a")), MALFORMED),
    ("subscribe-qos-3-v3", 4, frame(0x82, b"\x00\x01" + s("a") + b"\x03"), MALFORMED),
    ("subscribe-qos-3-v5", 5, frame(0x82, b"\x00\x01\x00" + s("a") + b"\x03"), PROTOCOL),
    ("subscribe-reserved-bits-v3", 4, frame(0x82, b"\x00\x01" + s("a") + b"\x04"), MALFORMED),
    ("subscribe-reserved-bits-v5", 5, frame(0x82, b"\x00\x01\x00" + s("a") + b"\x40"), MALFORMED),
    ("retain-handling-3", 5, frame(0x82, b"\x00\x01\x00" + s("a") + b"\x30"), PROTOCOL),
    ("subscribe-empty-filter", 4, frame(0x82, b"\x00\x01" + s("") + b"\x00"), MALFORMED),
    ("subscribe-hash-not-last", 4, frame(0x82, b"\x00\x01" + s("a/#/b") + b"\x00"), MALFORMED),
    ("subscribe-hash-in-level", 4, frame(0x82, b"\x00\x01" + s("a/b#") + b"\x00"), MALFORMED),
    ("subscribe-plus-in-level", 5, frame(0x82, b"\x00\x01\x00" + s("a+/b") + b"\x00"), MALFORMED),
    (
        "share-wildcard-group",
        5,
        frame(0x82, b"\x00\x01\x00" + s("$share/+/a") + b"\x00"),
        MALFORMED,
    ),
    ("share-no-filter", 5, frame(0x82, b"\x00\x01\x00" + s("$share/g") + b"\x00"), MALFORMED),
    ("share-empty-group", 5, frame(0x82, b"\x00\x01\x00" + s("$share//a") + b"\x00"), MALFORMED),
    ("share-no-local", 5, frame(0x82, b"\x00\x01\x00" + s("$share/g/a") + b"\x04"), PROTOCOL),
    ("unsubscribe-no-filter", 4, frame(0xA2, b"\x00\x01"), PROTOCOL),
    ("unsubscribe-no-filter-v5", 5, frame(0xA2, b"\x00\x01\x00"), PROTOCOL),
    ("unsubscribe-bad-filter", 4, frame(0xA2, b"\x00\x01" + s("#/a")), MALFORMED),
    ("suback-no-code", 4, b"\x90\x02\x00\x01", PROTOCOL),
    ("suback-reserved-code-v3", 4, b"\x90\x03\x00\x01\x03", MALFORMED),
    ("suback-v5-code-on-v3", 4, b"\x90\x03\x00\x01\x87", MALFORMED),
    ("unsuback-no-code-v5", 5, b"\xb0\x03\x00\x01\x00", PROTOCOL),
    ("connack-reserved-ack-flags", 4, b"\x20\x02\x02\x00", MALFORMED),
    ("connack-reserved-code-v3", 4, b"\x20\x02\x00\x06", MALFORMED),
    # --- MQTT 5 properties ---
    (
        "duplicate-property",
        5,
        frame(0xE0, b"\x00\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02"),
        PROTOCOL,
    ),
    (
        "duplicate-subscription-identifier-in-subscribe",
        5,
        frame(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02" + s("a") + b"\x00"),
        PROTOCOL,
    ),
    ("duplicate-topic-alias", 5, frame(0x30, s("a") + b"\x06\x23\x00\x01\x23\x00\x02"), PROTOCOL),
    ("unknown-property", 5, frame(0xE0, b"\x00\x02\x04\x00"), MALFORMED),
    ("unknown-property-0", 5, frame(0xE0, b"\x00\x02\x00\x00"), MALFORMED),
    ("unknown-property-multibyte-id", 5, frame(0xE0, b"\x00\x03\x81\x01\x00"), MALFORMED),
    ("property-not-allowed-here", 5, frame(0xE0, b"\x00\x03\x23\x00\x01"), MALFORMED),
    ("will-delay-outside-will", 5, frame(0x30, s("a") + b"\x05\x18\x00\x00\x00\x01"), MALFORMED),
    ("property-length-past-end", 5, frame(0xE0, b"\x00\x05\x11"), MALFORMED),
    ("property-value-truncated", 5, frame(0xE0, b"\x00\x02\x11\x00"), MALFORMED),
    ("property-length-not-shortest", 5, frame(0xE0, b"\x00\x80\x00"), MALFORMED),
    ("receive-maximum-0", 5, connect(0x02, s("c"), level=5, props=b"\x03\x21\x00\x00"), PROTOCOL),
    (
        "maximum-packet-size-0",
        5,
        connect(0x02, s("c"), level=5, props=b"\x05\x27\x00\x00\x00\x00"),
        PROTOCOL,
    ),
    ("request-problem-info-2", 5, connect(0x02, s("c"), level=5, props=b"\x02\x17\x02"), PROTOCOL),
    ("payload-format-2", 5, frame(0x30, s("a") + b"\x02\x01\x02"), PROTOCOL),
    (
        "subscription-identifier-0",
        5,
        frame(0x82, b"\x00\x01\x02\x0b\x00" + s("a") + b"\x00"),
        PROTOCOL,
    ),
    ("maximum-qos-2", 5, b"\x20\x05\x00\x00\x02\x24\x02", PROTOCOL),
    ("response-topic-wildcard", 5, frame(0x30, s("a") + b"\x06\x08" + s("r/+") + b"x"), PROTOCOL),
    (
        "will-property-in-connect",
        5,
        connect(0x02, s("c"), level=5, props=b"\x05\x18\x00\x00\x00\x01"),
        MALFORMED,
    ),
]


@pytest.mark.parametrize(
    ("version", "raw", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed(version: int, raw: bytes, code: int) -> None:
    with pytest.raises(MalformedPacket) as info:
        decode(raw, version=version)
    assert info.value.v5_reason_code == code, info.value.reason
    assert type(info.value) is MalformedPacket  # not an UnsupportedProtocolVersion
    # Trailing bytes change nothing, and there is no NEED_DATA for a broken packet.
    with pytest.raises(MalformedPacket):
        decode(raw + b"\x00" * 8, version=version)


def test_case_ids_are_unique() -> None:
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("raw", "name", "level"),
    [
        (connect(0x02, s("c"), name=b"MQIsdp", level=3), "MQIsdp", 3),
        (connect(0x02, s("c"), level=3), "MQTT", 3),
        (connect(0x02, s("c"), level=6), "MQTT", 6),
        (connect(0x02, b"", level=0), "MQTT", 0),
        # Only the name and the level are read: the rest may be anything.
        (frame(0x10, s("MQIsdp") + b"\x03\xff\xff"), "MQIsdp", 3),
    ],
)
@pytest.mark.parametrize("version", [4, 5])
def test_unsupported_protocol_version(raw: bytes, name: str, level: int, version: int) -> None:
    with pytest.raises(UnsupportedProtocolVersion) as info:
        decode(raw, version=version)
    assert info.value.protocol_name == name
    assert info.value.protocol_level == level
    assert info.value.v5_reason_code == 0x84
    assert info.value.v3_return_code == 0x01
    assert isinstance(info.value, MalformedPacket) and isinstance(info.value, ValueError)


def test_password_without_username_is_valid_on_v5() -> None:
    raw = connect(0x42, s("c") + s("pw"), level=5)
    result = decode(raw, version=5)
    assert result == (
        Connect(protocol_level=5, client_id="c", password=b"pw", keepalive=60),
        len(raw),
    )


def test_subscription_identifier_may_repeat_in_publish() -> None:
    raw = frame(0x30, s("a") + b"\x04\x0b\x01\x0b\x02" + b"x")
    result = decode(raw, version=5)
    assert result is not NEED_DATA
    packet = result[0]
    assert isinstance(packet, Publish)
    assert packet.properties.subscription_identifiers == (1, 2)


def test_user_property_may_repeat_with_the_same_key() -> None:
    prop = b"\x26" + s("k") + s("v")
    raw = frame(0x82, b"\x00\x01" + bytes([2 * len(prop)]) + prop + prop + s("a") + b"\x00")
    result = decode(raw, version=5)
    assert result is not NEED_DATA
    assert isinstance(result[0], Subscribe)
    assert result[0].properties.user_properties == (("k", "v"), ("k", "v"))


def test_empty_topic_with_alias_is_valid_on_v5() -> None:
    raw = frame(0x30, s("") + b"\x03\x23\x00\x07" + b"x")
    result = decode(raw, version=5)
    assert result is not NEED_DATA
    assert isinstance(result[0], Publish)
    assert result[0].topic == "" and result[0].topic_alias == 7


@pytest.mark.parametrize("version", [4, 5])
def test_oversized_is_refused_from_the_fixed_header(version: int) -> None:
    # 2 + 127 = 129 bytes in total; only the fixed header has arrived.
    with pytest.raises(MalformedPacket) as info:
        decode(b"\x30\x7f", version=version, max_packet_size=128)
    assert info.value.v5_reason_code == TOO_LARGE
    with pytest.raises(MalformedPacket) as info:
        decode(b"\x30\x80\x01", version=version, max_packet_size=130)
    assert info.value.v5_reason_code == TOO_LARGE
    with pytest.raises(MalformedPacket) as info:
        split_frame(b"\x30\xff\xff\xff\x7f", 1 << 20)
    assert info.value.v5_reason_code == TOO_LARGE
    # Exactly at the limit is fine; the body is awaited.
    assert decode(b"\x30\x7f", version=version, max_packet_size=129) is NEED_DATA
    # A header still incomplete is not judged yet.
    assert decode(b"\x30\x80", version=version, max_packet_size=10) is NEED_DATA


@pytest.mark.parametrize("version", [4, 5])
def test_limit_counts_the_fixed_header(version: int) -> None:
    raw = frame(0xC0, b"")
    assert decode(raw, version=version, max_packet_size=2) == (Pingreq(), 2)
    with pytest.raises(MalformedPacket):
        decode(raw, version=version, max_packet_size=1)
