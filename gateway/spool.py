"""The on-disk spool of one gateway worker: append-only segment files of framed records.

File layout: ``<spool_dir>/<number:012d>.seg`` (numbered in creation order), one chain per
spool directory, guarded by an exclusive ``flock`` on ``<spool_dir>/lock`` so two processes
never append to one spool.

Segment format::

    header  = MAGIC (8 bytes) | u32 length | JSON {"chain_id", "base_seq", "base_hash"}
    record  = u32 length | u32 crc32(payload) | payload            (little endian)
    zeros   = the preallocated rest of the file (a zero length ends the records)

Invariants:

- A segment's header names the chain head *before* its first record (``base_seq``,
  ``base_hash``), so the newest segment alone tells where the chain stands, even when every
  record in it has been shipped. The active segment is never deleted, so a restarted worker
  always continues its chain instead of forking it.
- `Spool.append` returns only after ``fdatasync``: what it wrote survives a crash. A new
  segment is made durable (file and directory fsynced) before any record goes into it.
- Segments are preallocated with zeros (``segment_bytes``) when created, so appends
  overwrite allocated blocks and ``fdatasync`` flushes data only: no file-size change, no
  filesystem journal commit per group commit (on ext4: 0.2 ms instead of 4 ms).
- Recovery stops at the first record whose length is zero or whose CRC is wrong (a torn
  write from ``kill -9`` or power loss mid-append) and zeroes the bytes after it. Only
  unacknowledged records can be torn, because acknowledgement waits for the fsync.
- Segments are deleted only through `Spool.release`, which the sink calls after the records
  up to a seq are committed in PostgreSQL.
- Not thread-safe: the sink calls every method from one I/O thread, in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"DGSPOOL1"
_HEADER_LEN = struct.Struct("<I")
FRAME = struct.Struct("<II")
"""Record frame: payload length, CRC-32 of the payload."""
_MAX_RECORD = 16 * 1024 * 1024  # anything larger is corruption, not an event


class SpoolError(Exception):
    """The spool directory cannot be used (locked by another process, other chain, I/O)."""


def frame(payload: bytes) -> bytes:
    """``payload`` framed for a segment: length, CRC-32, bytes."""
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(slots=True)
class Segment:
    """One segment file and what the spool knows about it."""

    path: Path
    base_seq: int
    base_hash: str
    last_seq: int
    size: int
    """Bytes in use (header and records): where the next record is written."""
    allocated: int
    """Bytes on disk (preallocated)."""

    @property
    def first_seq(self) -> int:
        return self.base_seq + 1


@dataclass(frozen=True, slots=True)
class Recovered:
    """What a spool held at start: the chain head and the payloads not yet known shipped."""

    chain_id: str | None
    head_seq: int | None
    head_hash: str | None
    payloads: list[bytes]


def _header(chain_id: str, base_seq: int, base_hash: str) -> bytes:
    body = json.dumps(
        {"chain_id": chain_id, "base_seq": base_seq, "base_hash": base_hash},
        separators=(",", ":"),
    ).encode()
    return MAGIC + _HEADER_LEN.pack(len(body)) + body


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def read_segment(data: bytes) -> tuple[dict[str, object], list[bytes], int]:
    """Parse a segment's bytes: (header, payloads, offset just past the last valid record).

    Raises:
        SpoolError: the header itself is unreadable (not a spool segment).
    """
    prefix = len(MAGIC) + _HEADER_LEN.size
    if len(data) < prefix or not data.startswith(MAGIC):
        raise SpoolError("not a spool segment (bad magic)")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    end = prefix + header_len
    try:
        header = json.loads(data[prefix:end])
    except ValueError as exc:
        raise SpoolError(f"unreadable segment header: {exc}") from exc
    if not isinstance(header, dict) or len(data) < end:
        raise SpoolError("unreadable segment header")
    payloads: list[bytes] = []
    offset = end
    while offset + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, offset)
        start = offset + FRAME.size
        if length == 0 or length > _MAX_RECORD or start + length > len(data):
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            break
        payloads.append(payload)
        offset = start + length
    return header, payloads, offset


class Spool:
    """Segment files of one chain in one directory.

    Args:
        directory: the spool directory (created if missing).
        segment_bytes: size after which the active segment is closed and a new one begun.
    """

    def __init__(self, directory: Path, *, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self.bytes = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._chain_id = ""
        self._head_hash = ""
        self._next_number = 0
        # The next segment, preallocated ahead of need by `prepare_spare` (another thread).
        self._spare_lock = threading.Lock()
        self._spare: tuple[int, Path, int] | None = None
        self._preparing = False

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> Recovered:
        """Lock the directory, repair a torn tail, and return what it holds.

        Raises:
            SpoolError: another process holds the spool, or it is unreadable.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(f"spool {self.directory} is in use by another process") from None
        chain_id: str | None = None
        head_seq: int | None = None
        head_hash: str | None = None
        payloads: list[bytes] = []
        for path in sorted(self.directory.glob("*.seg")):
            with contextlib.suppress(ValueError):
                self._next_number = max(self._next_number, int(path.stem))
            data = path.read_bytes()
            try:
                header, records, valid = read_segment(data)
            except SpoolError as exc:
                # An unused spare, or a header that never became durable: no record in it
                # was ever acknowledged.
                if data.strip(b"\0"):
                    log.warning("removing unreadable spool segment %s: %s", path, exc)
                path.unlink()
                continue
            tail = len(data[valid:].rstrip(b"\0"))
            if tail:
                log.warning(
                    "spool segment %s: zeroing %d bytes of torn or corrupt tail", path, tail
                )
                with open(path, "r+b") as handle:
                    handle.seek(valid)
                    handle.write(bytes(tail))
                    os.fsync(handle.fileno())
            seg_chain = str(header["chain_id"])
            if chain_id is not None and seg_chain != chain_id:
                raise SpoolError(f"spool {self.directory} mixes chains {chain_id} and {seg_chain}")
            chain_id = seg_chain
            base_seq = int(str(header["base_seq"]))
            base_hash = str(header["base_hash"])
            last_seq = base_seq + len(records)
            self.segments.append(Segment(path, base_seq, base_hash, last_seq, valid, len(data)))
            self.bytes += len(data)
            payloads.extend(records)
            if records:
                head_seq, head_hash = last_seq, records[-1][32:64].hex()
            else:
                head_seq, head_hash = base_seq, base_hash
        return Recovered(chain_id, head_seq, head_hash, payloads)

    def close(self) -> None:
        """Close the active segment and release the directory lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:  # an unused spare goes: it would be deleted at open anyway
            os.close(spare[0])
            spare[1].unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- writing ---------------------------------------------------------------------------

    def start_segment(self, chain_id: str, base_seq: int, base_hash: str) -> None:
        """Close the active segment (if any) and durably begin the next one.

        Uses the spare segment when `prepare_spare` has made one: then only the header is
        written (data, no metadata), which keeps rotation off the latency of ``record``.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._chain_id = chain_id
        last = self.segments[-1] if self.segments else None
        if last is not None and last.last_seq == base_seq and last.base_seq == base_seq:
            # A restart after a clean shutdown: the empty segment already names this head.
            self._fd = os.open(last.path, os.O_WRONLY)
            return
        header = _header(chain_id, base_seq, base_hash)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[2] >= len(header):
            fd, path, allocated = spare
            _write_at(fd, header, 0)
            os.fdatasync(fd)
        else:
            if spare is not None:
                os.close(spare[0])
            path = self.directory / self._reserve_name()
            allocated = max(self.segment_bytes, len(header))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            _write_at(fd, header + bytes(allocated - len(header)), 0)
            os.fsync(fd)
            _fsync_dir(self.directory)
        self._fd = fd
        self.segments.append(Segment(path, base_seq, base_hash, base_seq, len(header), allocated))
        self.bytes += allocated

    def wants_spare(self) -> bool:
        """Whether the active segment is half full and no spare is ready or being made."""
        active = self.segments[-1] if self.segments else None
        return (
            active is not None
            and self._spare is None
            and not self._preparing
            and active.size * 2 >= active.allocated
        )

    def prepare_spare(self) -> None:
        """Preallocate the next segment file (zero header), from a thread of its own.

        A file whose header is still zeros holds no record; recovery deletes it.
        """
        with self._spare_lock:
            if self._spare is not None or self._preparing:
                return
            self._preparing = True
            path = self.directory / self._reserve_name()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            _write_at(fd, bytes(self.segment_bytes), 0)
            os.fsync(fd)
            _fsync_dir(self.directory)
        finally:
            with self._spare_lock:
                self._preparing = False
        with self._spare_lock:
            self._spare = (fd, path, self.segment_bytes)

    def _reserve_name(self) -> str:
        # Segment files sort by this counter; their headers say which seqs they hold.
        self._next_number += 1
        return f"{self._next_number:012d}.seg"

    def append(self, data: bytes, last_seq: int, last_hash: str) -> None:
        """Write framed records ending at ``last_seq`` and ``fdatasync`` them.

        Rotates to a new segment first when the active one is full, so a record never
        straddles two files.
        """
        active = self.segments[-1]
        if active.size + len(data) > active.allocated and active.last_seq > active.base_seq:
            self.start_segment(self._chain_id, active.last_seq, self._head_hash)
            active = self.segments[-1]
        assert self._fd is not None
        _write_at(self._fd, data, active.size)
        os.fdatasync(self._fd)
        active.last_seq = last_seq
        active.size += len(data)
        if active.size > active.allocated:  # one group larger than a segment: the file grew
            self.bytes += active.size - active.allocated
            active.allocated = active.size
        self._head_hash = last_hash

    def set_head(self, head_hash: str) -> None:
        """Tell the spool the current head hash (used as the base of the next segment)."""
        self._head_hash = head_hash

    # -- releasing -------------------------------------------------------------------------

    def release(self, committed_seq: int, *, rotate: bool = False) -> int:
        """Delete closed segments whose records are all committed; returns bytes freed.

        Args:
            committed_seq: every record up to this seq is committed in PostgreSQL.
            rotate: also replace a fully committed active segment however small (a clean
                shutdown: the next start then has nothing to replay).
        """
        freed = 0
        while len(self.segments) > 1 and self.segments[0].last_seq <= committed_seq:
            segment = self.segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            freed += segment.allocated
        active = self.segments[-1] if self.segments else None
        if (
            active is not None
            and active.last_seq <= committed_seq
            and (rotate or active.size >= self.segment_bytes // 2)
            and active.last_seq > active.base_seq
        ):
            # Fully shipped and big enough: begin a fresh segment so this one can go.
            self.start_segment(self._chain_id, active.last_seq, self._head_hash)
            self.segments.remove(active)
            active.path.unlink()
            freed += active.allocated
        self.bytes -= freed
        return freed

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)
