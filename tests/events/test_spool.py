"""The spool's segment files, without a database (the record encoding: test_event_codec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.events.codec import encode_event
from gateway.events.spool import Spool, SpoolError, SpoolFull, frame, read_segment
from schemas.events import GENESIS_HASH, AuthEvent
from tests.events.conftest import fill, make_event, tmpfs


def _payload(seq: int, prev: bytes = bytes(32)) -> bytes:
    event: AuthEvent = make_event(seq)
    payload, _, _ = encode_event(event, chain_id="c", seq=seq, prev_digest=prev)
    return payload


def _chain(count: int, first: int = 1, prev: bytes = bytes(32)) -> list[bytes]:
    """``count`` payloads chained after ``prev``, seqs from ``first``."""
    payloads = []
    for seq in range(first, first + count):
        payloads.append(_payload(seq, prev))
        prev = payloads[-1][32:64]
    return payloads


def _three_records(tmp_path: Path) -> tuple[Path, list[bytes]]:
    spool = Spool(tmp_path, segment_bytes=1 << 16)
    spool.open()
    spool.start_segment("c", 0, GENESIS_HASH)
    records = _chain(3)
    spool.append(b"".join(frame(p) for p in records), 3, records[-1][32:64].hex())
    spool.close()
    return next(tmp_path.glob("*.seg")), records


def test_segments_are_preallocated(tmp_path: Path) -> None:
    segment, records = _three_records(tmp_path)
    assert segment.stat().st_size == 1 << 16
    _, payloads, _ = read_segment(segment.read_bytes())
    assert payloads == records


def test_a_torn_tail_is_zeroed_and_the_head_recovered(tmp_path: Path) -> None:
    segment, records = _three_records(tmp_path)
    _, _, end = read_segment(segment.read_bytes())
    with segment.open("r+b") as handle:  # kill -9 in the middle of the next append
        handle.seek(end)
        handle.write(frame(_payload(4, records[-1][32:64]))[:37])

    again = Spool(tmp_path, segment_bytes=1 << 16)
    recovered = again.open()
    assert recovered.chain_id == "c"
    assert recovered.payloads == records
    assert (recovered.head_seq, recovered.head_hash) == (3, records[-1][32:64].hex())
    data = segment.read_bytes()
    assert read_segment(data)[2] == end and not data[end:].strip(b"\0")
    again.close()


def test_a_corrupt_record_ends_the_segment(tmp_path: Path) -> None:
    segment, records = _three_records(tmp_path)
    data = bytearray(segment.read_bytes())
    _, _, end = read_segment(bytes(data))
    data[end - 5] ^= 0xFF  # a flipped bit in the last record: its CRC no longer matches
    _, payloads, valid = read_segment(bytes(data))
    assert payloads == records[:2]
    assert valid == end - len(frame(records[2]))


def test_an_empty_segment_still_names_the_head(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=1 << 20)
    spool.open()
    spool.start_segment("c", 41, "ab" * 32)
    spool.close()
    again = Spool(tmp_path, segment_bytes=1 << 20)
    recovered = again.open()
    assert (recovered.head_seq, recovered.head_hash, recovered.payloads) == (41, "ab" * 32, [])
    again.close()


def test_release_keeps_the_active_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=600)
    spool.open()
    spool.start_segment("c", 0, GENESIS_HASH)
    for seq, payload in enumerate(_chain(7), start=1):
        spool.append(frame(payload), seq, payload[32:64].hex())
    assert len(spool.segments) > 2
    spool.release(7)
    assert [s.base_seq for s in spool.segments] == [7]
    assert sorted(p.name for p in tmp_path.glob("*.seg")) == [spool.segments[0].path.name]
    spool.close()


def test_the_spool_is_locked_to_one_process(tmp_path: Path) -> None:
    first = Spool(tmp_path, segment_bytes=1 << 20)
    first.open()
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, segment_bytes=1 << 20).open()
    first.close()


def _append(spool: Spool, payloads: list[bytes], last_seq: int) -> None:
    spool.append(b"".join(frame(p) for p in payloads), last_seq, payloads[-1][32:64].hex())


def test_a_stale_frame_that_does_not_chain_is_not_replayed(tmp_path: Path) -> None:
    # An append failed (no space) after writing two whole frames; the next append
    # overwrote the first with a frame of the same length. The second is CRC-valid but
    # chains after a record that never was: recovery must stop before it.
    segment, records = _three_records(tmp_path)
    _, _, end = read_segment(segment.read_bytes())
    failed = _chain(2, first=4, prev=records[-1][32:64])
    retried = _payload(4, records[-1][32:64])
    assert len(retried) == len(failed[0]) and retried != failed[0]
    with segment.open("r+b") as handle:
        handle.seek(end)
        handle.write(frame(failed[0]) + frame(failed[1]))
        handle.seek(end)
        handle.write(frame(retried))

    recovered = Spool(tmp_path, segment_bytes=1 << 16)
    assert recovered.open().payloads == [*records, retried]
    recovered.close()


def test_a_segment_that_starts_below_its_predecessor_cuts_its_orphans(tmp_path: Path) -> None:
    # A failed append grew the active segment, then the next group rotated: the new
    # segment begins at the last acknowledged record, below the failed records.
    spool = Spool(tmp_path, segment_bytes=1 << 16)
    spool.open()
    spool.start_segment("c", 0, GENESIS_HASH)
    first = _chain(5)
    _append(spool, first, 5)
    spool.start_segment("c", 3, first[2][32:64].hex())
    second = _chain(2, first=4, prev=first[2][32:64])
    _append(spool, second, 5)
    spool.close()

    again = Spool(tmp_path, segment_bytes=1 << 16)
    recovered = again.open()
    assert recovered.payloads == first[:3] + second
    assert (recovered.head_seq, recovered.head_hash) == (5, second[-1][32:64].hex())
    assert [(s.base_seq, s.last_seq) for s in again.segments] == [(0, 3), (3, 5)]
    again.close()


def test_no_space_leaves_the_spool_as_it_was_and_recovers(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", 64 * 1024) as fs:
        spool = Spool(fs / "spool", segment_bytes=4096)
        spool.open()
        spool.start_segment("c", 0, GENESIS_HASH)
        filler = fill(fs)
        payloads = _chain(40)
        seq = 0
        with pytest.raises(SpoolFull):  # the active segment fills; the next cannot be made
            for payload in payloads:
                _append(spool, [payload], seq + 1)
                seq += 1
        assert 3 <= seq < 40 and spool.no_space
        on_disk = [p.name for p in spool.directory.glob("*.seg")]
        assert [s.path.name for s in spool.segments] == on_disk
        with pytest.raises(SpoolFull):  # and again: nothing half-made is left behind
            _append(spool, [payloads[seq]], seq + 1)
        assert len(list(spool.directory.glob("*.seg"))) == 1
        assert spool.release(seq) == 0  # fully shipped, but no room for a fresh segment
        assert len(spool.segments) == 1

        filler.unlink()
        _append(spool, payloads[seq:], 40)
        assert not spool.no_space and len(spool.segments) == 2
        spool.close()
        again = Spool(fs / "spool", segment_bytes=4096)
        recovered = again.open()
        assert recovered.payloads == payloads and recovered.head_seq == 40
        again.close()


def test_a_partial_write_on_a_full_disk_is_never_replayed(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", 64 * 1024) as fs:
        spool = Spool(fs / "spool", segment_bytes=4096)
        spool.open()
        spool.start_segment("c", 0, GENESIS_HASH)
        filler = fill(fs, leave=4096)  # room for one more page
        big = _chain(20)  # ~12 KiB: grows the empty active segment past its 4 KiB
        with pytest.raises(SpoolFull):
            _append(spool, big, 20)
        segment = spool.segments[0].path
        assert read_segment(segment.read_bytes())[1][:2] == big[:2]  # whole frames on disk
        retried = _payload(1, bytes(32))
        assert len(retried) == len(big[0])
        _append(spool, [retried], 1)  # overwrites the first stale frame only
        spool.close()
        filler.unlink()
        again = Spool(fs / "spool", segment_bytes=4096)
        recovered = again.open()
        assert recovered.payloads == [retried] and recovered.head_seq == 1
        assert not segment.read_bytes()[read_segment(segment.read_bytes())[2] :].strip(b"\0")
        again.close()
