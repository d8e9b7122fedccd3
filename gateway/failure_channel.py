"""One failed-handshake budget per instance: each worker tells its siblings its failures.

`gateway.limits.FailureLimiter` is a token bucket per address inside one worker process.
With ``--workers N`` the kernel spreads an attacker's connections over N listeners, so N
private buckets would let N times the documented budget through. Here each worker sends
the failures it saw to its siblings, and every worker charges its own limiter with all the
failures of the instance, so each limiter sees the instance's budget.
The budget decides whether an address's failures are events of their own or summarised,
and whether its handshakes wait for slots (`gateway.limits`); it never refuses at accept
while the address's queue has room.

Why messages and not a shared-memory table: the check at accept stays what it was, a
lookup in the worker's own dict (no lock, no shared hash table to size, no entry a dead
worker left half written, no cross-process LRU); the only new cost is on the failure
path, which already paid for a TLS handshake and an event. The price: a sibling learns of
a failure one loop tick later, so a burst that lands on several workers within that tick
can exceed the budget by a few failures; and a restarted worker starts with full buckets
(its inbox may still hold what its siblings sent meanwhile, which it charges at start).

The wiring, chosen so no one has to name, find or clean up anything:

* The supervisor (`Mesh`) makes one AF_UNIX datagram socketpair per worker: worker i
  reads the inbox end of pair i, and writes to the other end of every sibling's pair (a
  datagram written there arrives in that sibling's inbox). The fds are inherited
  (``pass_fds``) and named on the worker's command line (``--failure-inbox FD
  --failure-outbox FD ...``). The supervisor keeps every pair open, so a restarted worker
  gets the same inbox, and a dead worker's inbox just fills (its siblings then drop what
  does not fit). No file system path, and no process outside the instance holds them.
  One worker needs no channel.
* Bounded work: failures are counted per address key and flushed once per loop tick (one
  datagram per sibling, more only beyond `MAX_DATAGRAM` bytes), never blocking: a full
  inbox drops the datagram (``stats.dropped``). A reader takes at most `READS_PER_WAKE`
  datagrams per wake-up, so a busy sibling cannot starve the loop; charging one key costs
  far less than the handshake the sibling did for it. Pending keys are capped at
  `MAX_PENDING` (beyond it, flushed at once).
* A datagram is ``MAGIC`` then entries (key length u8, count u16 big-endian, key as
  printable ASCII). Anything else is garbage: the whole datagram is ignored (counted in
  ``stats.garbage``, logged), never partly charged, never an exception in the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.limits import FailureLimiter

__all__ = [
    "MAGIC",
    "MAX_DATAGRAM",
    "ChannelFds",
    "ChannelStats",
    "FailureChannel",
    "GarbageMessage",
    "Mesh",
    "decode",
    "encode",
]

log = logging.getLogger("devicegate.gateway.failures")

MAGIC: Final = b"dgf1"
MAX_DATAGRAM: Final = 8192
READS_PER_WAKE: Final = 32
MAX_PENDING: Final = 4096
_ENTRY: Final = struct.Struct(">BH")  # key length, count
_MAX_COUNT: Final = 0xFFFF


class GarbageMessage(ValueError):
    """A datagram that is not a failure message (``str`` says why)."""


def encode(counts: Mapping[str, int]) -> Iterator[bytes]:
    """The datagrams (each at most `MAX_DATAGRAM` bytes) carrying ``counts``.

    Keys that cannot be carried (empty, longer than 255 bytes, not printable ASCII) are
    left out: address keys are IP addresses and /64 networks, so none are in practice.
    """
    parts = [MAGIC]
    size = len(MAGIC)
    for key, count in counts.items():
        raw = key.encode("utf-8")
        if count < 1 or not _valid_key(raw):
            continue
        entry = _ENTRY.pack(len(raw), min(count, _MAX_COUNT)) + raw
        if size + len(entry) > MAX_DATAGRAM:
            yield b"".join(parts)
            parts, size = [MAGIC], len(MAGIC)
        parts.append(entry)
        size += len(entry)
    if len(parts) > 1:
        yield b"".join(parts)


def decode(data: bytes) -> list[tuple[str, int]]:
    """The (key, count) entries of one datagram.

    Raises:
        GarbageMessage: anything but a well-formed message (nothing of it is to be used).
    """
    if len(data) > MAX_DATAGRAM:
        raise GarbageMessage(f"datagram of {len(data)} bytes, over {MAX_DATAGRAM}")
    if not data.startswith(MAGIC):
        raise GarbageMessage("no magic")
    entries: list[tuple[str, int]] = []
    at = len(MAGIC)
    while at < len(data):
        if at + _ENTRY.size > len(data):
            raise GarbageMessage(f"truncated entry header at byte {at}")
        length, count = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        raw = data[at : at + length]
        at += length
        if len(raw) != length or not _valid_key(raw):
            raise GarbageMessage(f"bad key before byte {at}")
        if count < 1:
            raise GarbageMessage(f"count 0 before byte {at}")
        entries.append((raw.decode("ascii"), count))
    if not entries:
        raise GarbageMessage("no entries")
    return entries


def _power_of_two(n: int) -> bool:
    """Log the 1st, 2nd, 4th, ... occurrence: a flood of them cannot flood the log."""
    return n & (n - 1) == 0


def _valid_key(raw: bytes) -> bool:
    return 0 < len(raw) <= 255 and all(0x21 <= b <= 0x7E for b in raw)


@dataclass(frozen=True, slots=True)
class ChannelFds:
    """One worker's ends of the mesh: the fd it reads, and one fd per sibling to write."""

    inbox: int
    outboxes: tuple[int, ...]

    def args(self) -> list[str]:
        """The worker's command-line arguments naming these fds."""
        args = ["--failure-inbox", str(self.inbox)]
        for fd in self.outboxes:
            args += ["--failure-outbox", str(fd)]
        return args

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.inbox, *self.outboxes)


class Mesh:
    """The supervisor's side: one datagram socketpair per worker, open for its whole life."""

    def __init__(self, workers: int) -> None:
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]

    def fds(self, index: int) -> ChannelFds:
        """Worker ``index``'s ends: its inbox, and the write end of every sibling's pair."""
        inbox = self._pairs[index][0].fileno()
        outboxes = tuple(pair[1].fileno() for i, pair in enumerate(self._pairs) if i != index)
        return ChannelFds(inbox, outboxes)

    def close(self) -> None:
        for pair in self._pairs:
            for sock in pair:
                sock.close()
        self._pairs = []


@dataclass(slots=True)
class ChannelStats:
    sent: int = 0
    dropped: int = 0
    received: int = 0
    garbage: int = 0


class FailureChannel:
    """A worker's side: tells its siblings its failures and charges theirs to a limiter.

    Call `failed` for every failure charged locally; `start` (on the running loop) reads
    the inbox; `close` flushes what is pending and closes the sockets.
    """

    def __init__(self, *, inbox: socket.socket, outboxes: Sequence[socket.socket]) -> None:
        self.inbox = inbox
        self.outboxes = list(outboxes)
        self.stats = ChannelStats()
        self._pending: dict[str, int] = {}
        self._flush_scheduled = False
        self._limiter: FailureLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_fds(cls, fds: ChannelFds) -> FailureChannel:
        """The channel on inherited fds (`Mesh.fds`, passed by the supervisor)."""
        return cls(
            inbox=socket.socket(fileno=fds.inbox),
            outboxes=[socket.socket(fileno=fd) for fd in fds.outboxes],
        )

    def start(self, limiter: FailureLimiter) -> None:
        """Charge the siblings' failures to ``limiter`` from now on."""
        self._limiter = limiter
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.inbox.fileno(), self._readable)
        self._readable()  # what the siblings sent before we started

    def failed(self, key: str) -> None:
        """One failed handshake from ``key`` here: tell the siblings at the end of this tick."""
        self._pending[key] = self._pending.get(key, 0) + 1
        if len(self._pending) >= MAX_PENDING:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send the pending counts to every sibling now (never blocks; a full inbox drops)."""
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for datagram in encode(pending):
            for outbox in self.outboxes:
                try:
                    outbox.send(datagram, socket.MSG_DONTWAIT)
                except OSError as exc:  # full (sibling dead or busy) or gone: best effort
                    self.stats.dropped += 1
                    if _power_of_two(self.stats.dropped):
                        log.warning("failure channel: dropped %d datagrams to siblings (%s)",
                                    self.stats.dropped, exc)  # fmt: skip
                else:
                    self.stats.sent += 1

    def _readable(self) -> None:
        limiter = self._limiter
        if limiter is None:
            return
        for _ in range(READS_PER_WAKE):
            try:
                data = self.inbox.recv(MAX_DATAGRAM + 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("failure channel: cannot read the inbox: %s", exc)
                self._stop_reading()
                return
            try:
                entries = decode(data)
            except GarbageMessage as exc:
                self.stats.garbage += 1
                if _power_of_two(self.stats.garbage):
                    log.warning("failure channel: ignored %d garbage datagrams (%s)",
                                self.stats.garbage, exc)  # fmt: skip
                continue
            self.stats.received += 1
            for key, count in entries:
                limiter.failed(key, count)

    def _stop_reading(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.inbox.fileno())

    def close(self) -> None:
        """Flush, stop reading and close the sockets (again: nothing)."""
        if self.inbox.fileno() < 0:
            return
        self.flush()
        self._stop_reading()
        self._loop = None
        self.inbox.close()
        for outbox in self.outboxes:
            outbox.close()
