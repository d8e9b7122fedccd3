"""Stream-level fuzzing of the MQTT codec: the way bytes really arrive.

The unit fuzz suite (tests/gateway/mqtt/test_mqtt_codec_fuzz.py) feeds one packet at a time.
Here streams of valid, mutated and random packets are concatenated and cut into random
chunks, and the properties that a session relies on are checked:

* Chunking changes nothing: any cut of a stream decodes to the same packets, and stops at
  the same error, as the whole stream at once.
* Bounded buffering: with ``max_packet_size`` set, a caller that buffers only while the
  codec says NEED_DATA never holds more than ``max_packet_size`` bytes (a too-large packet
  is refused at its fixed header), whatever the stream.
* A header that claims 256 MB is refused from its 5 header bytes.
* The PUBLISH fast path never accepts what the full decoder would not, and agrees on the
  frame's end.
* Only MalformedPacket (or the documented ValueError for a bad ``version`` argument) ever
  escapes; hypothesis reports anything else as a failure by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.fastpath import MORE, SLOW, allowed_publish_end
from gateway.mqtt import NEED_DATA, MalformedPacket, Packet, Publish, decode, encode, split_frame
from tests.gateway.mqtt.strategies import packets, publishes
from tests.gateway.mqtt.test_mqtt_codec_fuzz import _varint, mutated

VERSIONS = [4, 5]
MAX_REMAINING = 268_435_455  # the largest Remaining Length MQTT can express (~256 MB)


@dataclass
class Outcome:
    packets: list[Packet]
    error: int | None  # the reason code it stopped at
    leftover: int  # bytes held when the stream ended (a partial packet)
    peak: int  # most bytes ever held while waiting


def run_stream(chunks: list[bytes], version: int, limit: int | None) -> Outcome:
    """A session's receive loop: buffer, decode until NEED_DATA, stop at the first error."""
    buf = b""
    out: list[Packet] = []
    peak = 0
    for chunk in chunks:
        buf += chunk
        while True:
            try:
                result = decode(buf, version=version, max_packet_size=limit)
            except MalformedPacket as exc:
                return Outcome(out, exc.v5_reason_code, len(buf), peak)
            if result is NEED_DATA:
                peak = max(peak, len(buf))
                break
            packet, used = result
            out.append(packet)
            buf = buf[used:]
    return Outcome(out, None, len(buf), peak)


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
    return chunks


@st.composite
def streams(draw: st.DrawFn, version: int) -> tuple[bytes, list[Packet] | None]:
    """A concatenation of packets; also the packets when every item is a valid one."""
    items: list[bytes] = []
    valid: list[Packet] | None = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["valid", "valid", "valid", "mutated", "random"]))
        if kind == "valid":
            packet = draw(packets(version))
            items.append(encode(packet, version=version))
            if valid is not None:
                valid.append(packet)
        elif kind == "mutated":
            items.append(draw(mutated(version)))
            valid = None
        else:
            items.append(draw(st.binary(min_size=1, max_size=40)))
            valid = None
    return b"".join(items), valid


chunk_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=12)
limits = st.none() | st.integers(2, 300)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sizes=chunk_sizes, limit=limits)
def test_chunking_changes_nothing(
    version: int, data: st.DataObject, sizes: list[int], limit: int | None
) -> None:
    stream, valid = data.draw(streams(version))
    whole = run_stream([stream], version, limit)
    pieces = run_stream(cut(stream, sizes), version, limit)
    assert (pieces.packets, pieces.error) == (whole.packets, whole.error)
    if pieces.error is None:
        assert pieces.leftover == whole.leftover
    if valid is not None and limit is None:
        assert (whole.packets, whole.error, whole.leftover) == (valid, None, 0)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_byte_by_byte_equals_whole(version: int, data: st.DataObject) -> None:
    stream, _ = data.draw(streams(version))
    whole = run_stream([stream], version, None)
    single = run_stream([stream[i : i + 1] for i in range(len(stream))], version, None)
    assert (single.packets, single.error) == (whole.packets, whole.error)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sizes=chunk_sizes, limit=st.integers(2, 300))
def test_buffering_is_bounded_by_max_packet_size(
    version: int, data: st.DataObject, sizes: list[int], limit: int
) -> None:
    stream, _ = data.draw(streams(version))
    # Append a packet that claims more than the limit, with a body that keeps coming.
    first = data.draw(st.sampled_from([0x30, 0x32, 0x82, 0xC0, 0x10]))
    claimed = data.draw(st.integers(limit + 1, MAX_REMAINING))
    stream += bytes([first]) + _varint(claimed) + b"\x00" * data.draw(st.integers(0, 600))
    outcome = run_stream(cut(stream, sizes), version, limit)
    assert outcome.peak <= max(limit, 4), outcome  # NEED_DATA never while over the limit
    if outcome.error is None:  # an earlier, unfinished packet swallowed the big header
        assert outcome.leftover <= max(limit, 4)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("first", [0x10, 0x30, 0x32, 0x34, 0x82, 0xA2, 0xC0, 0xE0])
def test_256_mb_header_is_refused_at_the_header(version: int, first: int) -> None:
    header = bytes([first]) + _varint(MAX_REMAINING)
    assert len(header) == 5
    for n in range(1, 5):  # a strict prefix of the header: nothing to judge yet
        assert decode(header[:n], version=version, max_packet_size=65536) is NEED_DATA
    with pytest.raises(MalformedPacket) as refused:
        decode(header, version=version, max_packet_size=65536)
    assert refused.value.v5_reason_code == 0x95
    with pytest.raises(MalformedPacket):
        split_frame(header, 65536)
    # Streamed byte by byte, the session never holds more than the 5 header bytes.
    chunks = [header[i : i + 1] for i in range(5)] + [b"\x00" * 4096] * 4
    outcome = run_stream(chunks, version, 65536)
    assert (outcome.error, outcome.leftover, outcome.packets) == (0x95, 5, [])
    # Without a limit the codec waits (the caller's buffer limit is then the only bound).
    assert decode(header, version=version) is NEED_DATA


def test_remaining_length_beyond_four_bytes_is_refused_at_once() -> None:
    for version in VERSIONS:
        with pytest.raises(MalformedPacket):
            decode(b"\x30\xff\xff\xff\xff", version=version)


@pytest.mark.parametrize("v5", [False, True], ids=["v3", "v5"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), limit=st.integers(2, 400), cut_at=st.integers(0, 400))
def test_fast_path_never_accepts_what_the_decoder_refuses(
    v5: bool, data: st.DataObject, limit: int, cut_at: int
) -> None:
    version = 5 if v5 else 4
    publish = data.draw(publishes(version))
    raw = encode(publish, version=version)
    if data.draw(st.booleans()):
        raw = data.draw(mutated(version))
        if not raw or raw[0] >> 4 != 3:
            raw = bytes([0x30 | (raw[0] & 0x0F if raw else 0)]) + raw[1:]
    topic = publish.topic.encode()
    allowed = {topic: True, b"x": True}
    prefix = data.draw(st.binary(max_size=8))
    buf = prefix + raw[: cut_at if cut_at < len(raw) else len(raw)]
    pos = len(prefix)
    if pos >= len(buf):
        return
    end = allowed_publish_end(buf, pos, len(buf), v5=v5, max_packet_size=limit, allowed=allowed)
    assert end in (MORE, SLOW) or pos < end <= len(buf)
    try:
        result = decode(buf[pos:], version=version, max_packet_size=limit)
    except MalformedPacket:
        assert end <= 0, "the fast path accepted a packet the decoder refuses"
        return
    if result is NEED_DATA:
        assert end <= 0
        return
    if end > 0:
        packet, used = result
        assert isinstance(packet, Publish) and used == end - pos
        assert packet.topic.encode() in allowed
