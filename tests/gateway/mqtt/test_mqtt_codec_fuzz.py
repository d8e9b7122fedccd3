"""The fuzz rule: parse it, or raise MalformedPacket, never anything else.

Random bytes rarely get past the fixed header, so valid packets are also
mutated (and re-framed, so that the mutated body is actually parsed).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt import NEED_DATA, Connect, MalformedPacket, decode, encode, split_frame

from .strategies import packets

VERSIONS = [4, 5]
REASON_CODES = {0x81, 0x82, 0x84, 0x95}


def check(raw: bytes, version: int, max_packet_size: int | None = None) -> None:
    """Apply every invariant that holds for arbitrary input."""
    try:
        result = decode(raw, version=version, max_packet_size=max_packet_size)
    except MalformedPacket as e:
        assert e.v5_reason_code in REASON_CODES
        assert e.reason
        # The verdict does not depend on what follows.
        with pytest.raises(MalformedPacket) as again:
            decode(raw + b"\x00\xff", version=version, max_packet_size=max_packet_size)
        assert again.value.v5_reason_code == e.v5_reason_code
        return
    if result is NEED_DATA:
        return
    packet, used = result
    assert 2 <= used <= len(raw)
    if max_packet_size is not None:
        assert used <= max_packet_size
    frame = split_frame(raw)
    assert frame is not NEED_DATA and frame[3] == used
    # Trailing data changes nothing.
    assert decode(raw + b"\x00\xff", version=version, max_packet_size=max_packet_size) == result
    # Whatever the decoder accepts, the encoder writes back, and that decodes the same.
    v = packet.protocol_level if isinstance(packet, Connect) else version
    encoded = encode(packet, version=v)
    assert decode(encoded, version=v) == (packet, len(encoded))


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=80), limit=st.none() | st.integers(0, 100))
def test_random_bytes(version: int, raw: bytes, limit: int | None) -> None:
    check(raw, version, limit)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=200, deadline=None)
@given(first=st.integers(0, 255), body=st.binary(max_size=60))
def test_random_body_behind_a_valid_fixed_header(version: int, first: int, body: bytes) -> None:
    raw = bytes([first]) + _varint(len(body)) + body
    check(raw, version)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, version: int) -> bytes:
    raw = encode(draw(packets(version)), version=version)
    frame = split_frame(raw)
    assert frame is not NEED_DATA
    body = bytearray(raw[frame[2] :])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(body) - 1, 0)))
        if op == "insert" or not body:
            body.insert(i, draw(st.integers(0, 255)))
        elif op == "flip":
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            body[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x23, 0x26, 0x2B]))
        elif op == "delete":
            del body[i]
        else:
            del body[i:]
    first = raw[0] if draw(st.integers(0, 9)) else draw(st.integers(0, 255))
    return bytes([first]) + _varint(len(body)) + bytes(body)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_valid_packets(version: int, data: st.DataObject) -> None:
    check(data.draw(mutated(version)), version)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=100, deadline=None)
@given(data=st.data(), cut=st.integers(0, 200))
def test_truncated_remaining_length_is_need_data_or_malformed(
    version: int, data: st.DataObject, cut: int
) -> None:
    """A valid packet whose stated length is larger than the bytes present waits."""
    raw = encode(data.draw(packets(version)), version=version)
    check(raw[: cut % (len(raw) + 1)], version)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=150, deadline=None)
@given(block=st.binary(max_size=40))
def test_random_property_blocks(version: int, block: bytes) -> None:
    """Random bytes where MQTT 5 expects properties (DISCONNECT, PUBLISH, CONNECT)."""
    check(b"\xe0" + _varint(len(block) + 2) + b"\x00" + _varint(len(block)) + block, version)
    body = b"\x00\x01t" + _varint(len(block)) + block
    check(b"\x30" + _varint(len(body)) + body, version)
    body = b"\x00\x04MQTT\x05\x02\x00\x00" + _varint(len(block)) + block + b"\x00\x00"
    check(b"\x10" + _varint(len(body)) + body, version)
