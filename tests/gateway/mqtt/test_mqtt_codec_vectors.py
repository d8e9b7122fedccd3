"""Known byte vectors: captured from real clients, and computed by hand from the spec."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from gateway.mqtt import (
    NEED_DATA,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    RawPacket,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    decode,
    encode,
    split_frame,
)

P = PropertyId


def decode_stream(raw: bytes, version: int) -> list[Packet]:
    out = []
    pos = 0
    while pos < len(raw):
        result = decode(raw[pos:], version=version)
        assert result is not NEED_DATA
        out.append(result[0])
        pos += result[1]
    return out


# --- captured from real clients ------------------------------------------------

# mosquitto_pub 2.0.11: -i mosqpub -t test/topic -m hello -V mqttv311
MOSQUITTO_PUB_V311 = bytes.fromhex(
    "101300044d5154540402003c00076d6f73717075623011000a746573742f746f70696368656c6c6fe000"
)
# mosquitto_pub 2.0.11: -i mosqpub -t test/topic -m hello -V mqttv5 -u dev1 -P pw -r
#   -D publish user-property k v -D connect session-expiry-interval 60
MOSQUITTO_PUB_V5 = bytes.fromhex(
    "102600044d51545405c2003c08110000003c21001400076d6f7371707562"
    "000464657631000270773119000a746573742f746f706963072600016b00017668656c6c6f"
    "e000"
)
# paho-mqtt 2.2.0, MQTTv5: client id paho-test, user dev1 / secret, keepalive 30,
# publish devices/dev1/t b"hi" qos 1 with user property k=v, subscribe devices/dev1/# qos 1.
PAHO_V5 = bytes.fromhex(
    "102400044d51545405c2001e0000097061686f2d746573740004646576310006736563726574"
    "321c000e646576696365732f646576312f740001072600016b000176"
    "6869"
    "8214000200000e646576696365732f646576312f2301"
)


def test_mosquitto_pub_v311() -> None:
    assert decode_stream(MOSQUITTO_PUB_V311, 4) == [
        Connect(protocol_level=4, client_id="mosqpub", clean_start=True, keepalive=60),
        Publish(topic="test/topic", payload=b"hello"),
        Disconnect(),
    ]
    assert b"".join(encode(p, version=4) for p in decode_stream(MOSQUITTO_PUB_V311, 4)) == (
        MOSQUITTO_PUB_V311
    )


def test_mosquitto_pub_v5() -> None:
    assert decode_stream(MOSQUITTO_PUB_V5, 5) == [
        Connect(
            protocol_level=5,
            client_id="mosqpub",
            keepalive=60,
            username="dev1",
            password=b"pw",
            properties=Properties.of((P.SESSION_EXPIRY_INTERVAL, 60), (P.RECEIVE_MAXIMUM, 20)),
        ),
        Publish(
            topic="test/topic",
            payload=b"hello",
            retain=True,
            properties=Properties.of((P.USER_PROPERTY, ("k", "v"))),
        ),
        Disconnect(),
    ]
    assert b"".join(encode(p, version=5) for p in decode_stream(MOSQUITTO_PUB_V5, 5)) == (
        MOSQUITTO_PUB_V5
    )


def test_paho_v5() -> None:
    assert decode_stream(PAHO_V5, 5) == [
        Connect(
            protocol_level=5,
            client_id="paho-test",
            keepalive=30,
            username="dev1",
            password=b"secret",
        ),
        Publish(
            topic="devices/dev1/t",
            payload=b"hi",
            qos=1,
            packet_id=1,
            properties=Properties.of((P.USER_PROPERTY, ("k", "v"))),
        ),
        Subscribe(
            packet_id=2,
            subscriptions=(Subscription(topic_filter="devices/dev1/#", qos=1),),
        ),
    ]
    assert b"".join(encode(p, version=5) for p in decode_stream(PAHO_V5, 5)) == PAHO_V5


# --- computed by hand from the specification ------------------------------------

VECTORS: list[tuple[str, int, Packet, str]] = [
    ("connack-v3", 4, Connack(), "20 02 00 00"),
    ("connack-v3-present-5", 4, Connack(session_present=True, reason_code=5), "20 02 01 05"),
    ("connack-v5-0x86", 5, Connack(session_present=True, reason_code=0x86), "20 03 01 86 00"),
    (
        "connack-v5-properties",
        5,
        Connack(
            properties=Properties.of(
                (P.MAXIMUM_QOS, 1),
                (P.TOPIC_ALIAS_MAXIMUM, 10),
                (P.ASSIGNED_CLIENT_IDENTIFIER, "abc"),
            )
        ),
        "20 0e 00 00 0b 24 01 22 00 0a 12 00 03 61 62 63",
    ),
    ("publish-v3-qos0", 4, Publish(topic="a/b", payload=b"hi"), "30 07 00 03 61 2f 62 68 69"),
    (
        "publish-v3-dup-qos1-retain",
        4,
        Publish(topic="t", qos=1, dup=True, retain=True, packet_id=10),
        "3b 05 00 01 74 00 0a",
    ),
    (
        "publish-v5-alias-only",
        5,
        Publish(
            topic="",
            payload=b"x",
            qos=2,
            packet_id=0x1234,
            properties=Properties.of((P.TOPIC_ALIAS, 5)),
        ),
        "34 09 00 00 12 34 03 23 00 05 78",
    ),
    (
        "publish-v3-rl-203",
        4,
        Publish(topic="t", payload=b"x" * 200),
        "30 cb 01 00 01 74" + " 78" * 200,
    ),
    ("puback-v3", 4, Puback(packet_id=1), "40 02 00 01"),
    ("pubrec-v3", 4, Pubrec(packet_id=1), "50 02 00 01"),
    ("pubrel-v3", 4, Pubrel(packet_id=1), "62 02 00 01"),
    ("pubcomp-v3", 4, Pubcomp(packet_id=1), "70 02 00 01"),
    ("puback-v5-success", 5, Puback(packet_id=1), "40 02 00 01"),
    ("puback-v5-not-authorized", 5, Puback(packet_id=1, reason_code=0x87), "40 03 00 01 87"),
    (
        "puback-v5-reason-string",
        5,
        Puback(packet_id=1, reason_code=0x10, properties=Properties.of((P.REASON_STRING, "no"))),
        "40 09 00 01 10 05 1f 00 02 6e 6f",
    ),
    (
        "subscribe-v3",
        4,
        Subscribe(packet_id=10, subscriptions=(Subscription(topic_filter="devices/d1/#", qos=1),)),
        "82 11 00 0a 00 0c" + "".join(f" {b:02x}" for b in b"devices/d1/#") + " 01",
    ),
    (
        "subscribe-v5-options",
        5,
        Subscribe(
            packet_id=1,
            subscriptions=(
                Subscription(
                    topic_filter="a",
                    qos=2,
                    no_local=True,
                    retain_as_published=True,
                    retain_handling=2,
                ),
            ),
            properties=Properties.of((P.SUBSCRIPTION_IDENTIFIER, 300)),
        ),
        "82 0a 00 01 03 0b ac 02 00 01 61 2e",
    ),
    ("suback-v3", 4, Suback(packet_id=10, reason_codes=(1, 0x80)), "90 04 00 0a 01 80"),
    ("suback-v5-0x87", 5, Suback(packet_id=10, reason_codes=(0x87,)), "90 04 00 0a 00 87"),
    (
        "unsubscribe-v3",
        4,
        Unsubscribe(packet_id=2, topic_filters=("a/+", "b")),
        "a2 0a 00 02 00 03 61 2f 2b 00 01 62",
    ),
    ("unsuback-v3", 4, Unsuback(packet_id=2), "b0 02 00 02"),
    ("unsuback-v5", 5, Unsuback(packet_id=2, reason_codes=(0, 0x11)), "b0 05 00 02 00 00 11"),
    ("pingreq-v3", 4, Pingreq(), "c0 00"),
    ("pingresp-v5", 5, Pingresp(), "d0 00"),
    ("disconnect-v3", 4, Disconnect(), "e0 00"),
    ("disconnect-v5-normal", 5, Disconnect(), "e0 00"),
    ("disconnect-v5-0x98", 5, Disconnect(reason_code=0x98), "e0 01 98"),
    (
        "disconnect-v5-taken-over",
        5,
        Disconnect(reason_code=0x8E, properties=Properties.of((P.REASON_STRING, "taken over"))),
        "e0 0f 8e 0d 1f 00 0a" + "".join(f" {b:02x}" for b in b"taken over"),
    ),
    ("auth-v5-success", 5, Auth(), "f0 00"),
    (
        "auth-v5-continue",
        5,
        Auth(
            reason_code=0x18,
            properties=Properties.of(
                (P.AUTHENTICATION_METHOD, "SCRAM-SHA-1"), (P.AUTHENTICATION_DATA, b"\x01\x02")
            ),
        ),
        "f0 15 18 13 15 00 0b" + "".join(f" {b:02x}" for b in b"SCRAM-SHA-1") + " 16 00 02 01 02",
    ),
    (
        "connect-v3-will-user-password",
        4,
        Connect(
            protocol_level=4,
            client_id="c1",
            keepalive=10,
            username="u",
            password=b"p",
            will=Will(topic="w", payload=b"bye", qos=1, retain=True),
        ),
        "10 1c 00 04 4d 51 54 54 04 ee 00 0a 00 02 63 31 00 01 77 00 03 62 79 65 00 01 75 00 01 70",
    ),
    (
        "connect-v5-will-properties",
        5,
        Connect(
            protocol_level=5,
            client_id="",
            keepalive=0,
            properties=Properties.of((P.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF)),
            will=Will(
                topic="w",
                payload=b"",
                properties=Properties.of(
                    (P.WILL_DELAY_INTERVAL, 5), (P.PAYLOAD_FORMAT_INDICATOR, 1)
                ),
            ),
        ),
        "10 1f 00 04 4d 51 54 54 05 06 00 00 05 11 ff ff ff ff 00 00"
        " 07 18 00 00 00 05 01 01 00 01 77 00 00",
    ),
]


@pytest.mark.parametrize(
    ("version", "packet", "hex_bytes"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS]
)
def test_vector(version: int, packet: Packet, hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    assert encode(packet, version=version) == raw
    assert decode(raw, version=version) == (packet, len(raw))


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        # MQTT 3.1.1 table 2.4 / MQTT 5 section 1.5.5
        (0, "00"),
        (127, "7f"),
        (128, "80 01"),
        (16_383, "ff 7f"),
        (16_384, "80 80 01"),
        (2_097_151, "ff ff 7f"),
        (2_097_152, "80 80 80 01"),
        (268_435_455, "ff ff ff 7f"),
    ],
)
def test_remaining_length_boundaries(length: int, encoded: str) -> None:
    header = b"\x30" + bytes.fromhex(encoded)
    assert split_frame(header) == (3, 0, len(header), len(header) + length)
    if length < 3_000_000:
        raw = encode(RawPacket(packet_type=3, flags=0, body=b"\x00" * length), version=4)
        assert raw[: len(header)] == header
        assert len(raw) == len(header) + length
        if length:
            assert decode(raw[:-1], version=4) is NEED_DATA


# --- a real client against the codec ---------------------------------------------


def _fake_broker(version: int, args: list[str]) -> list[Packet]:
    """Run mosquitto_pub against a listener that speaks through the codec."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        mqtt_version = "mqttv5" if version == 5 else "mqttv311"
        command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", mqtt_version]
        proc = subprocess.Popen([*command, *args], stderr=subprocess.PIPE)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                received: list[Packet] = []
                buffer = b""
                while not received or not isinstance(received[-1], Disconnect):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buffer += chunk
                    while (result := decode(buffer, version=version)) is not NEED_DATA:
                        packet, used = result
                        buffer = buffer[used:]
                        received.append(packet)
                        if isinstance(packet, Connect):
                            conn.sendall(encode(Connack(), version=version))
                        elif isinstance(packet, Publish) and packet.packet_id is not None:
                            conn.sendall(
                                encode(Puback(packet_id=packet.packet_id), version=version)
                            )
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""
    return received


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto_pub not installed")
@pytest.mark.parametrize("version", [4, 5])
def test_live_mosquitto_pub(version: int) -> None:
    args = ["-i", "live", "-t", "devices/d1/t", "-m", "payload", "-q", "1", "-u", "d1"]
    if version == 5:
        args += [
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
            "-D",
            "publish",
            "message-expiry-interval",
            "30",
        ]
    packets = _fake_broker(version, args)
    assert [type(p) for p in packets] == [Connect, Publish, Disconnect]
    connect, publish, _ = packets
    assert isinstance(connect, Connect) and isinstance(publish, Publish)
    assert connect.protocol_level == version
    assert (connect.client_id, connect.username) == ("live", "d1")
    assert (publish.topic, bytes(publish.payload), publish.qos) == ("devices/d1/t", b"payload", 1)
    if version == 5:
        assert publish.properties.user_properties == (("k", "v"),)
        assert publish.properties.get(P.MESSAGE_EXPIRY_INTERVAL) == 30
