"""Write seed inputs for the harnesses: valid MQTT packets, PROXY v2 headers, and byte
strings for the event encoder's FuzzedDataProvider.

Each codec and proxy seed starts with a few bytes the harness's FuzzedDataProvider turns
into its parameters (version, limit, cut), then the stream. Usage:
``python fuzz/seeds.py DIR`` (writes DIR/codec/*, DIR/proxy/* and DIR/event_codec/*;
existing files are kept).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import sys
from pathlib import Path

from gateway.mqtt import (
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Publish,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
    encode,
)
from gateway.proxy import SIGNATURE


def mqtt_seeds() -> list[bytes]:
    seeds = []
    for version in (4, 5):
        packets: list[Packet] = [
            Connect(client_id="dev-1", protocol_level=version, keepalive=30),
            Connect(
                client_id="dev-2",
                protocol_level=version,
                username="u",
                password=b"p",
                will=Will(topic="devices/dev-2/status", payload=b"gone", qos=1, retain=True),
            ),
            Publish(topic="devices/dev-1/t", payload=b"21.5", qos=0),
            Publish(topic="devices/dev-1/t", payload=b"x" * 200, qos=1, packet_id=7),
            Subscribe(
                packet_id=3, subscriptions=(Subscription(topic_filter="devices/dev-1/#", qos=1),)
            ),
            Unsubscribe(packet_id=4, topic_filters=("devices/dev-1/#",)),
            Puback(packet_id=7),
            Pingreq(),
            Disconnect(),
        ]
        stream = b"".join(encode(packet, version=version) for packet in packets)
        params = bytes([1 if version == 5 else 0, 0, 0, 0, 0, 0, 0, 0, 0])
        seeds.append(params + stream)
        seeds.extend(params + encode(packet, version=version) for packet in packets)
    return seeds


def proxy_seeds() -> list[bytes]:
    v4 = socket.inet_aton("192.0.2.10") + socket.inet_aton("198.51.100.1")
    v4 += struct.pack("!HH", 40000, 8883)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1") * 2 + struct.pack("!HH", 1, 2)
    tlv = bytes([0x01]) + struct.pack("!H", 2) + b"h2"
    headers = [
        SIGNATURE + b"\x21\x11" + struct.pack("!H", len(v4)) + v4,
        SIGNATURE + b"\x21\x11" + struct.pack("!H", len(v4 + tlv)) + v4 + tlv,
        SIGNATURE + b"\x21\x21" + struct.pack("!H", len(v6)) + v6,
        SIGNATURE + b"\x20\x00\x00\x00",
        SIGNATURE + b"\x21\x00\x00\x00",
    ]
    params = b"\x00\x10\x00\x00\x05\x00\x00\x00\x00"
    return [params + header + b"\x16\x03\x01" for header in headers]


def event_seeds() -> list[bytes]:
    """The event harness reads every field from the provider, so any bytes make an event:
    an empty input (every field at its minimum) and a few deterministic pseudo-random
    streams of growing length, long enough to reach nested details and every field."""
    seeds = [b""]
    for length in (16, 64, 256, 1024):
        stream = b"".join(
            hashlib.sha256(f"event-{length}-{block}".encode()).digest()
            for block in range(length // 32 + 1)
        )
        seeds.append(stream[:length])
    return seeds


def main(directory: str) -> None:
    harnesses = (("codec", mqtt_seeds()), ("proxy", proxy_seeds()), ("event_codec", event_seeds()))
    for name, seeds in harnesses:
        target = Path(directory) / name
        target.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (target / hashlib.sha1(seed).hexdigest()).write_bytes(seed)  # noqa: S324


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
