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
- Recovery stops at the first record whose length is zero, whose CRC is wrong (a torn
  write from ``kill -9`` or power loss mid-append) or whose ``prev_hash`` is not the hash
  before it (a stale frame of an append that failed and was overwritten), and zeroes the
  bytes after it. A segment whose header starts below its predecessor's last record
  cuts those records off (an append that failed after a partial write, then rotation).
  Only unacknowledged records can be dropped, because acknowledgement waits for the fsync.
- No space (ENOSPC, EDQUOT) is not fatal: an append or rotation that hits it raises
  `SpoolFull`, leaves the segment list and the active segment as they were (a new file
  that could not be completed is removed) and sets `Spool.no_space` until a new segment
  file is made again. Other errors, and any ``fdatasync`` failure, propagate as
  ``OSError``.
- Segments are deleted only through `Spool.release`, which the sink calls after the records
  up to a seq are committed in PostgreSQL.
- Not thread-safe: the sink calls every method from one I/O thread, in order.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
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
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_SPARE_RETRY = 0.2  # seconds between attempts to make a spare while the disk is full


class SpoolError(Exception):
    """The spool directory cannot be used (locked by another process, other chain, I/O)."""


class SpoolFull(SpoolError):
    """No space left on the spool's filesystem: nothing of the failed append is durable."""


def _no_space(exc: OSError) -> bool:
    return exc.errno in _NO_SPACE


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

    A valid record has its length, its CRC, and a payload whose first 32 bytes (the
    ``prev_hash``) are the hash of the record before it (the header's ``base_hash`` for
    the first one).

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
    try:
        head = bytes.fromhex(str(header.get("base_hash", "")))
    except ValueError as exc:
        raise SpoolError(f"unreadable segment header: {exc}") from exc
    while offset + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, offset)
        start = offset + FRAME.size
        if length < 64 or length > _MAX_RECORD or start + length > len(data):
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc or payload[:32] != head:
            break
        head = payload[32:64]
        payloads.append(payload)
        offset = start + length
    return header, payloads, offset


def unshipped_chain(directory: Path) -> str | None:
    """The chain id of a spool that may hold events not yet shipped, or None.

    Cheap (a header and one frame per segment, nothing verified): a spool whose segments
    hold no record (a clean shutdown leaves one empty segment naming the head) returns
    None. The spool keeps no shipped mark on disk, so records may be shipped already;
    replaying them is idempotent (the sink's staging table).
    """
    prefix = len(MAGIC) + _HEADER_LEN.size
    chain: str | None = None
    for path in sorted(directory.glob("*.seg")):
        try:
            with open(path, "rb") as handle:
                start = handle.read(prefix)
                if len(start) < prefix or not start.startswith(MAGIC):
                    continue  # a spare (zeros) or a header never made durable
                (header_len,) = _HEADER_LEN.unpack_from(start, len(MAGIC))
                header = json.loads(handle.read(header_len))
                first = handle.read(FRAME.size)
        except (OSError, ValueError):
            continue
        if isinstance(header, dict) and len(first) == FRAME.size and FRAME.unpack(first)[0]:
            chain = str(header.get("chain_id"))
    return chain


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
        self.no_space = False
        """The filesystem refused space since a new segment file was last made."""
        self._spare_failed_at = -_SPARE_RETRY

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
            if head_seq is not None and base_seq < head_seq:
                # Records of an append that failed (no space) after a partial write: the
                # next segment began at the head before them, so they were never acked.
                cut = head_seq - base_seq
                previous = self.segments[-1]
                if cut > previous.last_seq - previous.base_seq:
                    raise SpoolError(f"spool segment {path} starts before its predecessor")
                log.warning("spool segment %s: dropping %d unacknowledged records", path, cut)
                del payloads[len(payloads) - cut :]
                previous.last_seq = head_seq = base_seq
                head_hash = (
                    payloads[-1][32:64].hex()
                    if previous.last_seq > previous.base_seq
                    else previous.base_hash
                )
            if head_hash is not None and head_seq == base_seq and base_hash != head_hash:
                raise SpoolError(f"spool segment {path} does not continue the chain")
            last_seq = base_seq + len(records)
            self.segments.append(Segment(path, base_seq, base_hash, last_seq, valid, len(data)))
            self.bytes += len(data)
            payloads.extend(records)
            if records:
                head_seq, head_hash = last_seq, records[-1][32:64].hex()
            else:
                head_seq, head_hash = base_seq, base_hash
        return Recovered(chain_id, head_seq, head_hash, payloads)

    def discard(self) -> None:
        """Delete every segment (after `open`, before any write): the sink begins a new
        chain because the database cannot continue this one, and all of it is shipped."""
        for segment in self.segments:
            segment.path.unlink(missing_ok=True)
        self.segments.clear()
        self.bytes = 0
        _fsync_dir(self.directory)

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

        Raises:
            SpoolFull: no space for the new segment; the active one stays as it was.
        """
        self._chain_id = chain_id
        last = self.segments[-1] if self.segments else None
        if last is not None and last.last_seq == base_seq and last.base_seq == base_seq:
            # A restart after a clean shutdown: the empty segment already names this head.
            if self._fd is None:
                self._fd = os.open(last.path, os.O_WRONLY)
            return
        header = _header(chain_id, base_seq, base_hash)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[2] >= len(header):
            fd, path, allocated = spare
            try:
                _write_at(fd, header, 0)
                os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                path.unlink()
                raise
        else:
            if spare is not None:
                os.close(spare[0])
                spare[1].unlink()
            path = self.directory / self._reserve_name()
            allocated = max(self.segment_bytes, len(header))
            fd = self._create(path, header + bytes(allocated - len(header)))
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.segments.append(Segment(path, base_seq, base_hash, base_seq, len(header), allocated))
        self.bytes += allocated

    def resume(self, chain_id: str) -> None:
        """Append to the newest segment instead of beginning one: a start with no space
        for a new segment. `open` left it valid up to its last record, zeros after."""
        self._chain_id = chain_id
        if self._fd is None:
            self._fd = os.open(self.segments[-1].path, os.O_WRONLY)

    def wants_spare(self) -> bool:
        """Whether no spare is ready or being made, and the active segment is half full or
        the disk was full (then at most every ``_SPARE_RETRY`` seconds: it may have room)."""
        active = self.segments[-1] if self.segments else None
        if active is None or self._spare is not None or self._preparing:
            return False
        if self.no_space:
            return time.monotonic() - self._spare_failed_at >= _SPARE_RETRY
        return active.size * 2 >= active.allocated

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
            fd = self._create(path, bytes(self.segment_bytes))
        except SpoolFull:
            self._spare_failed_at = time.monotonic()
            raise
        finally:
            with self._spare_lock:
                self._preparing = False
        with self._spare_lock:
            self._spare = (fd, path, self.segment_bytes)

    def _create(self, path: Path, data: bytes) -> int:
        """A new durable file holding ``data``; on failure none (SpoolFull: no space)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_at(fd, data, 0)
            os.fsync(fd)
            _fsync_dir(self.directory)
        except BaseException as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            if isinstance(exc, OSError) and _no_space(exc):
                self.no_space = True
                raise SpoolFull(f"no space for a spool segment in {self.directory}") from exc
            raise
        self.no_space = False
        return fd

    def _reserve_name(self) -> str:
        # Segment files sort by this counter; their headers say which seqs they hold.
        self._next_number += 1
        return f"{self._next_number:012d}.seg"

    def append(self, data: bytes, last_seq: int, last_hash: str) -> None:
        """Write framed records ending at ``last_seq`` and ``fdatasync`` them.

        Rotates to a new segment first when the active one is full, so a record never
        straddles two files.

        Raises:
            SpoolFull: no space (for the next segment, or for a group larger than a
                segment); the spool is unchanged and the caller's chain head must go
                back to the last appended record.
            OSError: anything else, ``fdatasync`` failures included: fatal.
        """
        active = self.segments[-1]
        if active.size + len(data) > active.allocated and active.last_seq > active.base_seq:
            self.start_segment(self._chain_id, active.last_seq, self._head_hash)
            active = self.segments[-1]
        assert self._fd is not None
        try:
            _write_at(self._fd, data, active.size)
        except OSError as exc:
            if not _no_space(exc):
                raise
            # Whatever was written past ``size`` is unacknowledged: the next append
            # overwrites it, and recovery drops it (prev_hash or header check).
            self.no_space = True
            raise SpoolFull(f"no space for spool records in {self.directory}") from exc
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
        self.bytes -= freed
        active = self.segments[-1] if self.segments else None
        if (
            active is not None
            and active.last_seq <= committed_seq
            and (rotate or active.size >= self.segment_bytes // 2)
            and active.last_seq > active.base_seq
        ):
            # Fully shipped and big enough: begin a fresh segment so this one can go.
            try:
                self.start_segment(self._chain_id, active.last_seq, self._head_hash)
            except SpoolFull:
                return freed  # no room for a fresh one: keep appending to this one
            self.segments.remove(active)
            active.path.unlink()
            self.bytes -= active.allocated
            freed += active.allocated
        return freed

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)
