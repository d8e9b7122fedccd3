"""Stream properties of the two byte paths, under every way TCP may cut them."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.actions import Close, Record, ToDevice, ToUpstream
from gateway.connection import Session
from gateway.downstream import Downstream, SubackMerge
from gateway.mqtt import Pingresp, Publish, Suback, encode
from tests.gateway.test_connection import admit, new_session

payloads = st.binary(max_size=300)
publishes = st.builds(
    lambda p, q: Publish(topic="devices/d1/t", payload=p, qos=q, packet_id=1 if q else None),
    payloads,
    st.integers(0, 2),
)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


@settings(max_examples=80, deadline=None)
@given(
    before=st.lists(publishes, max_size=5),
    after=st.lists(publishes, max_size=5),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    version=st.sampled_from([4, 5]),
)
def test_downstream_passes_everything_and_merges_subacks(
    before: list[Publish], after: list[Publish], cuts: list[int], version: int
) -> None:
    downstream = Downstream(version)
    downstream.merges[9] = SubackMerge((0x80, None, 0x80))
    head = b"".join(encode(p, version=version) for p in before)
    tail = b"".join(encode(p, version=version) for p in [*after, Pingresp()])
    suback = encode(Suback(packet_id=9, reason_codes=(1,)), version=version)
    merged = encode(Suback(packet_id=9, reason_codes=(0x80, 1, 0x80)), version=version)
    out = b"".join(
        bytes(c) for piece in _cut(head + suback + tail, cuts) for c in downstream.feed(piece)
    )
    assert out == head + merged + tail
    assert downstream.packets == len(before) + len(after) + 2
    assert downstream.merges == {}


@settings(max_examples=80, deadline=None)
@given(
    packets=st.lists(publishes, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    version=st.sampled_from([4, 5]),
)
def test_allowed_device_bytes_are_forwarded_exactly(
    packets: list[Publish], cuts: list[int], version: int
) -> None:
    session = new_session()
    admit(session, version)
    stream = b"".join(encode(p, version=version) for p in packets)
    forwarded = b""
    for piece in _cut(stream, cuts):
        for action in session.receive_device(piece):
            assert isinstance(action, ToUpstream), action
            forwarded += bytes(action.data)
    assert forwarded == stream


@settings(max_examples=60, deadline=None)
@given(
    packets=st.lists(st.tuples(publishes, st.booleans()), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_denied_publishes_are_cut_out_in_place(
    packets: list[tuple[Publish, bool]], cuts: list[int]
) -> None:
    session = new_session()
    admit(session, 5)
    stream, expected, denied = b"", b"", 0
    for packet, allowed in packets:
        if not allowed:
            packet = Publish(
                topic="devices/d2/t", payload=packet.payload, qos=packet.qos,
                packet_id=packet.packet_id,
            )  # fmt: skip
            denied += packet.qos > 0
        data = encode(packet, version=5)
        stream += data
        expected += data if allowed else b""
    forwarded, replies = b"", 0
    for piece in _cut(stream, cuts):
        for action in session.receive_device(piece):
            if isinstance(action, ToUpstream):
                forwarded += bytes(action.data)
            elif isinstance(action, ToDevice):
                replies += 1
    assert forwarded == expected
    assert replies == denied


def _outcome(session: Session, pieces: list[bytes]) -> tuple[bytes, bytes, list[Any], Any]:
    forwarded, replies, events, closed = b"", b"", [], None
    for piece in pieces:
        for action in session.receive_device(piece):
            if isinstance(action, ToUpstream):
                forwarded += bytes(action.data)
            elif isinstance(action, ToDevice):
                replies += bytes(action.data)
            elif isinstance(action, Record):
                event = action.event
                events.append((event.type, event.reason, event.detail))
            elif isinstance(action, Close):
                closed = action.reason
        if closed is not None:
            break
    return forwarded, replies, events, closed


@settings(max_examples=150, deadline=None)
@given(
    packets=st.lists(st.tuples(publishes, st.booleans()), min_size=1, max_size=6),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    version=st.sampled_from([4, 5]),
)
def test_fast_path_agrees_with_the_decoder(
    packets: list[tuple[Publish, bool]],
    mutations: list[tuple[int, int]],
    cuts: list[int],
    version: int,
) -> None:
    """Whatever the bytes, the fast path changes nothing but the speed."""
    stream = bytearray()
    for packet, mine in packets:
        topic = "devices/d1/t" if mine else "devices/d2/t"
        stream += encode(
            Publish(
                topic=topic, payload=packet.payload, qos=packet.qos, packet_id=packet.packet_id
            ),
            version=version,
        )
    for index, value in mutations:
        stream[index % len(stream)] = value
    pieces = _cut(bytes(stream), cuts)
    warm_up = encode(Publish(topic="devices/d1/t"), version=version)
    results = []
    for fast in (True, False):
        session = new_session()
        session.fast_path = fast
        admit(session, version)
        session.receive_device(warm_up)
        results.append(_outcome(session, pieces))
    assert results[0] == results[1]
