"""Round trips and incremental parsing, h11 style: whole, byte by byte, with trailing data."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt import (
    NEED_DATA,
    Connect,
    MalformedPacket,
    Packet,
    Publish,
    RawPacket,
    decode,
    encode,
    split_frame,
)

from .strategies import packets

VERSIONS = [4, 5]


def _encode(packet: Packet, version: int) -> bytes:
    return encode(packet, version=version)


def _one(raw: bytes | bytearray, version: int) -> Packet:
    result = decode(raw, version=version)
    assert result is not NEED_DATA
    assert result[1] == len(raw)
    return result[0]


def _decode_all(data: bytes | bytearray, version: int) -> tuple[list[Packet], int]:
    """Decode as many packets as ``data`` holds; return them and the bytes used."""
    out: list[Packet] = []
    pos = 0
    view = memoryview(data)
    while True:
        result = decode(view[pos:], version=version)
        if result is NEED_DATA:
            return out, pos
        packet, used = result
        out.append(packet)
        pos += used


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_round_trip(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    raw = _encode(packet, version)
    assert decode(raw, version=version) == (packet, len(raw))
    # Decoding, then encoding again gives the same bytes (canonical encoding).
    assert _encode(_one(raw, version), version) == raw
    # The frame splitter agrees with the decoder.
    frame = split_frame(raw)
    assert frame is not NEED_DATA
    assert frame[0] == raw[0] >> 4 and frame[1] == raw[0] & 0x0F and frame[3] == len(raw)
    # Forwarding a located frame without decoding it gives the same bytes.
    raw_packet = RawPacket(packet_type=frame[0], flags=frame[1], body=raw[frame[2] :])
    assert _encode(raw_packet, version) == raw


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_strict_prefix_needs_data(version: int, data: st.DataObject) -> None:
    raw = _encode(data.draw(packets(version)), version)
    for i in range(len(raw)):
        assert decode(raw[:i], version=version) is NEED_DATA, i
        assert split_frame(raw[:i]) is NEED_DATA or i >= 2


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_trailing_data_is_left_unconsumed(version: int, data: st.DataObject) -> None:
    packet = data.draw(packets(version))
    trailing = data.draw(st.binary(min_size=1, max_size=20))
    raw = _encode(packet, version)
    assert decode(raw + trailing, version=version) == (packet, len(raw))
    assert decode(bytearray(raw + trailing), version=version) == (packet, len(raw))
    assert decode(memoryview(raw + trailing), version=version) == (packet, len(raw))


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_byte_at_a_time_equals_whole_buffer(version: int, data: st.DataObject) -> None:
    stream = data.draw(st.lists(packets(version), min_size=1, max_size=5))
    raw = b"".join(_encode(p, version) for p in stream)

    whole, used = _decode_all(raw, version)
    assert whole == stream
    assert used == len(raw)

    # Feed one byte at a time, as a socket might.
    buffer = b""
    incremental: list[Packet] = []
    for i in range(len(raw)):
        buffer += raw[i : i + 1]
        got, used = _decode_all(buffer, version)
        incremental += got
        buffer = buffer[used:]
    assert buffer == b""
    assert incremental == stream


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_chunking_equals_whole_buffer(version: int, data: st.DataObject) -> None:
    stream = data.draw(st.lists(packets(version), min_size=1, max_size=6))
    raw = b"".join(_encode(p, version) for p in stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    buffer = bytearray()
    got: list[Packet] = []
    for start, stop in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        buffer += raw[start:stop]
        packets_, used = _decode_all(bytes(buffer), version)
        got += packets_
        del buffer[:used]
    assert got == stream


def test_publish_payload_is_a_view_not_a_copy() -> None:
    raw = encode(Publish(topic="t", payload=b"x" * 1000, qos=1, packet_id=1), version=4)
    packet = _one(raw, 4)
    assert isinstance(packet, Publish)
    assert isinstance(packet.payload, memoryview)
    assert packet.payload.obj is raw  # the caller's buffer itself
    assert packet.payload.readonly
    assert "payload=<1000 bytes: b'xxxx" in repr(packet)  # the content, not "<memory at ...>"
    assert "payload=b'ab'" in repr(Publish(topic="t", payload=memoryview(b"ab")))


def test_publish_payload_from_bytearray_is_read_only() -> None:
    buf = bytearray(encode(Publish(topic="t", payload=b"abc"), version=4))
    packet = _one(buf, 4)
    assert isinstance(packet, Publish)
    assert isinstance(packet.payload, memoryview)
    assert packet.payload.readonly
    with pytest.raises(TypeError):
        packet.payload[0] = 0
    assert hash(packet) == hash(Publish(topic="t", payload=b"abc"))


def test_connect_is_decoded_by_its_own_protocol_level() -> None:
    v5 = Connect(protocol_level=5, client_id="c")
    raw = encode(v5, version=5)
    assert decode(raw, version=4) == (v5, len(raw))
    with pytest.raises(MalformedPacket, match="protocol level"):
        encode(v5, version=4)


def test_version_must_be_4_or_5() -> None:
    with pytest.raises(ValueError, match="version"):
        decode(b"\xc0\x00", version=3)
    with pytest.raises(ValueError, match="version"):
        encode(Publish(topic="t"), version=6)
