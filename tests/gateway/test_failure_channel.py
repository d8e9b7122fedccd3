"""The failure channel between sibling workers, on a real socketpair mesh in one process:
a sibling's failures charge the local limiter, garbage is ignored, a full inbox drops."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.failure_channel import (
    MAGIC,
    MAX_DATAGRAM,
    FailureChannel,
    GarbageMessage,
    Mesh,
    decode,
    encode,
)
from gateway.limits import FailureLimiter

ATTACKER = "192.0.2.7"


def _sibling(mesh: Mesh, index: int) -> FailureChannel:
    """Worker ``index``'s channel, on its own copies of the fds (as a child process has)."""
    fds = mesh.fds(index)
    return FailureChannel(
        inbox=socket.socket(fileno=os.dup(fds.inbox)),
        outboxes=[socket.socket(fileno=os.dup(fd)) for fd in fds.outboxes],
    )


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    mesh = Mesh(3)
    yield mesh
    mesh.close()


async def _ticks(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_encode_decode_round_trip_and_split() -> None:
    counts = {ATTACKER: 3, "2001:db8:1:2::/64": 70_000, "10.0.0.1": 1}
    (datagram,) = encode(counts)
    assert decode(datagram) == [(ATTACKER, 3), ("2001:db8:1:2::/64", 0xFFFF), ("10.0.0.1", 1)]
    many = {f"10.{i // 65536}.{i // 256 % 256}.{i % 256}": 1 for i in range(2000)}
    datagrams = list(encode(many))
    assert len(datagrams) > 1 and all(len(d) <= MAX_DATAGRAM for d in datagrams)
    assert dict(entry for d in datagrams for entry in decode(d)) == many
    # Keys that cannot be carried are left out, never sent half.
    assert list(encode({"": 1, "x" * 256: 1, "bad key": 1, "é": 1, "ok": 0})) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"dgf0\x01\x00\x01a",  # wrong magic
        MAGIC,  # no entries
        MAGIC + b"\x01\x00",  # truncated entry header
        MAGIC + b"\x05\x00\x01ab",  # key shorter than its length
        MAGIC + b"\x01\x00\x00a",  # count 0
        MAGIC + b"\x00\x00\x01",  # empty key
        MAGIC + b"\x02\x00\x01a ",  # not printable
        MAGIC + b"\x01\x00\x01a" + b"\xff",  # a good entry then garbage: all rejected
        MAGIC + b"\x01\x00\x01a" * (MAX_DATAGRAM // 4),  # too long
    ],
)
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(GarbageMessage):
        decode(data)


@given(st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: MAGIC + b))
def test_decode_parses_or_raises_garbage_never_anything_else(data: bytes) -> None:
    try:
        entries = decode(data)
    except GarbageMessage:
        return
    assert entries and all(key and count >= 1 for key, count in entries)


async def test_failures_from_a_sibling_charge_the_local_limiter(mesh: Mesh) -> None:
    channels = [_sibling(mesh, i) for i in range(3)]
    limiters = [FailureLimiter(per_minute=4) for _ in range(3)]
    try:
        for channel, limiter in zip(channels, limiters, strict=True):
            channel.start(limiter)
        for _ in range(2):  # worker 0 saw two failures, worker 1 two more
            limiters[0].failed(ATTACKER)
            channels[0].failed(ATTACKER)
            limiters[1].failed(ATTACKER)
            channels[1].failed(ATTACKER)
        await _ticks()
        # Coalesced: one datagram per sibling per tick, whatever the number of failures.
        assert [c.stats.sent for c in channels] == [2, 2, 0]
        assert [c.stats.received for c in channels] == [1, 1, 2]
        # Every worker has seen the instance's four failures: the budget is spent everywhere.
        assert [limiter.allowed(ATTACKER) for limiter in limiters] == [False, False, False]
        assert all(limiter.allowed("192.0.2.8") for limiter in limiters)  # per address
    finally:
        for channel in channels:
            channel.close()
    channels[0].close()  # again: nothing


async def test_garbage_datagrams_are_ignored_safely(mesh: Mesh) -> None:
    channel = _sibling(mesh, 0)
    limiter = FailureLimiter(per_minute=2)
    writer = socket.socket(fileno=os.dup(mesh.fds(1).outboxes[0]))  # a sibling's way in
    try:
        channel.start(limiter)
        for garbage in (b"\x00" * 10, MAGIC + b"\x01\x00", b"x" * (MAX_DATAGRAM + 100)):
            writer.send(garbage)
        writer.send(next(encode({ATTACKER: 1})))
        await _ticks()
        assert (channel.stats.garbage, channel.stats.received) == (3, 1)
        assert len(limiter) == 1 and limiter.allowed(ATTACKER)  # one token of two taken
        writer.send(next(encode({ATTACKER: 1})))
        await _ticks()
        assert not limiter.allowed(ATTACKER)
    finally:
        writer.close()
        channel.close()


async def test_a_full_inbox_drops_without_blocking(mesh: Mesh) -> None:
    # Worker 1 is dead (nobody reads its inbox): worker 0 keeps going, and drops.
    channel = _sibling(mesh, 0)
    channel.start(FailureLimiter(per_minute=30))
    try:
        for i in range(5000):
            channel.failed(f"10.0.{i // 256}.{i % 256}")
            channel.flush()
            if channel.stats.dropped:
                break
        assert channel.stats.dropped > 0
    finally:
        channel.close()
