from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

from schemas.events import (
    GENESIS_HASH,
    AuthEvent,
    EventType,
    Outcome,
    Reason,
    canonical_bytes,
    chain_hash,
    uuid7,
)


def _event(**changes: object) -> AuthEvent:
    fields: dict[str, object] = {
        "instance": "gw-1",
        "type": EventType.CONNECT,
        "outcome": Outcome.DENIED,
        "reason": Reason.CLIENT_ID_MISMATCH,
        "device_id": "plant-a-1",
        "detail": {"z": 1, "a": [1, 2]},
        "time": datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC),
    }
    fields.update(changes)
    return AuthEvent.model_validate(fields)


def test_uuid7_is_time_ordered_and_versioned() -> None:
    first = uuid7(1_000_000_000_000_000_000)
    second = uuid7(1_000_000_000_001_000_000)
    assert first.version == 7
    assert first < second
    assert uuid7().bytes[:6] >= uuid7(time.time_ns() - 10**9).bytes[:6]


def test_canonical_encoding_is_sorted_compact_and_utc() -> None:
    encoded = canonical_bytes(_event())
    assert b'"time":"2026-11-29T12:00:00.123456Z"' in encoded
    assert b'"detail":{"a":[1,2],"z":1}' in encoded
    assert b", " not in encoded and b": " not in encoded
    assert b'"hash"' not in encoded


def test_chain_hash_is_sha256_of_previous_and_canonical() -> None:
    event = _event().chained(chain_id="gw-1/a", seq=1, prev_hash=GENESIS_HASH)
    expected = hashlib.sha256(bytes.fromhex(GENESIS_HASH) + canonical_bytes(event)).hexdigest()
    assert event.hash == expected == chain_hash(GENESIS_HASH, event)
    following = _event(reason=Reason.OK, outcome=Outcome.ALLOWED).chained(
        chain_id="gw-1/a", seq=2, prev_hash=event.hash
    )
    assert following.prev_hash == event.hash


def test_any_edit_changes_the_hash() -> None:
    event = _event().chained(chain_id="c", seq=1, prev_hash=GENESIS_HASH)
    assert event.hash is not None
    for change in (
        {"reason": Reason.OK},
        {"device_id": "other"},
        {"seq": 2},
        {"detail": {"z": 2, "a": [1, 2]}},
        {"peer_address": "10.0.0.1"},
    ):
        edited = event.model_copy(update=change)
        assert chain_hash(GENESIS_HASH, edited) != event.hash, change


def test_time_zone_does_not_change_the_hash() -> None:
    from datetime import timedelta, timezone

    utc = _event()
    shifted = _event(id=utc.id, time=utc.time.astimezone(timezone(timedelta(hours=5))))
    assert canonical_bytes(utc) == canonical_bytes(shifted)
