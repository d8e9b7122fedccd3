"""The auth event's encoding: canonical bytes, chain hash and COPY row.

`encode_event` runs the C accelerator (gateway/events/_codec.c) and falls back to
`encode_event_python`; every test here runs on both, and the two must agree byte for
byte on any event, refusals included.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.events.codec import (
    ACCELERATED,
    COLUMNS,
    Row,
    decode_payload,
    encode_event,
    encode_event_python,
)
from schemas.events import GENESIS_HASH, AuthEvent, canonical_bytes, chain_hash
from tests.events.conftest import make_event

Encoder = Callable[..., tuple[bytes, bytes, Row]]
both_encoders = pytest.mark.parametrize(
    "encode", [encode_event, encode_event_python], ids=["accelerated", "python"]
)

# Lone surrogates cannot be UTF-8 and never reach an event (the codec refuses them);
# test_surrogates_are_refused covers them.
_chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
_text = st.one_of(st.none(), st.text(_chars, max_size=20))
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(_chars, max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(_chars, max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def test_the_accelerator_is_built() -> None:
    # `make test` installs with a C compiler at hand: a failed build would pass every other
    # test here on the Python path and quietly double the sink's CPU per event.
    assert ACCELERATED, (
        "gateway.events._codec is not built; `pip install -v -e .` shows the compiler's error"
    )


@both_encoders
@settings(max_examples=150, deadline=None)
@given(
    device=_text,
    peer=_text,
    detail=st.dictionaries(st.text(_chars, max_size=6), _json, max_size=4),
    seq=st.integers(1, 2**40),
    moment=st.datetimes(
        min_value=datetime(1000, 1, 1), max_value=datetime(9998, 1, 1), timezones=st.just(UTC)
    ),
    offset=st.integers(-12, 12),
)
def test_the_encoding_is_the_canonical_one(
    encode: Encoder,
    device: str | None,
    peer: str | None,
    detail: dict[str, object],
    seq: int,
    moment: datetime,
    offset: int,
) -> None:
    event = make_event(
        device_id=device,
        peer_address=peer,
        detail=detail,
        time=moment if offset == 0 else moment.astimezone(timezone(timedelta(hours=offset))),
    )
    prev = os.urandom(32)
    payload, digest, row = encode(event, chain_id="gw/w0", seq=seq, prev_digest=prev)
    chained = event.chained(chain_id="gw/w0", seq=seq, prev_hash=prev.hex())
    assert payload[64:] == canonical_bytes(chained)
    assert payload[:32] == prev
    assert digest == payload[32:64]
    assert digest.hex() == chained.hash == chain_hash(prev.hex(), chained)
    assert decode_payload(payload) == row


# Anything at all: NUL, lone surrogates, controls, floats (NaN too), any time zone or none.
_any_text = st.one_of(st.none(), st.text(max_size=12))
_any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _outcome(encode: Encoder, event: AuthEvent, seq: int) -> object:
    try:
        payload, digest, row = encode(event, chain_id="gw/w1", seq=seq, prev_digest=bytes(32))
    except (ValueError, TypeError, RecursionError) as exc:
        return type(exc)
    return payload, digest, row, [type(value) for value in row]


@settings(max_examples=400, deadline=None)
@given(
    client_id=_any_text,
    cert_serial=_any_text,
    instance=st.text(max_size=12),
    detail=st.dictionaries(st.text(max_size=6), _any_json, max_size=4),
    seq=st.integers(-(2**70), 2**70),  # past 64 bits: the C declines
    moment=st.datetimes(timezones=st.none() | st.just(UTC) | st.timezones()),
)
def test_both_paths_agree_on_any_event(
    client_id: str | None,
    cert_serial: str | None,
    instance: str,
    detail: dict[str, Any],
    seq: int,
    moment: datetime,
) -> None:
    event = make_event(
        client_id=client_id, cert_serial=cert_serial, instance=instance, detail=detail, time=moment
    )
    assert _outcome(encode_event, event, seq) == _outcome(encode_event_python, event, seq)


@both_encoders
@pytest.mark.parametrize(
    "detail",
    [
        {"x": 1.5, "y": [0.1]},  # floats: json's repr rules stay in Python
        {"n": 2**70, "b": True, "z": None, "t": (1, "two")},
        {"deep": [[[[{"k": "v"}]]]], "empty": {}, "list": []},
        {"ctl": '\x01\x1f\x7f\b\f\n\r\t"\\', "ü": "日本"},
    ],
)
def test_details_of_every_json_kind(encode: Encoder, detail: dict[str, Any]) -> None:
    event = make_event(detail=detail)
    payload, _, row = encode(event, chain_id="c", seq=1, prev_digest=bytes(32))
    assert payload[64:] == canonical_bytes(
        event.chained(chain_id="c", seq=1, prev_hash=GENESIS_HASH)
    )
    assert row == encode_event_python(event, chain_id="c", seq=1, prev_digest=bytes(32))[2]


@both_encoders
def test_surrogates_are_refused(encode: Encoder) -> None:
    for event in (make_event(detail={"\ud800": None}), make_event(device_id="a\udfffb")):
        with pytest.raises(ValueError):
            encode(event, chain_id="c", seq=1, prev_digest=bytes(32))


@both_encoders
def test_other_time_zones_and_old_years_encode_as_the_reference(encode: Encoder) -> None:
    for moment in (
        datetime(999, 5, 1, tzinfo=UTC),
        datetime(2026, 12, 6, 9, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ):
        event = make_event(time=moment)
        payload, _, _ = encode(event, chain_id="c", seq=1, prev_digest=bytes(32))
        assert payload[64:] == canonical_bytes(
            event.chained(chain_id="c", seq=1, prev_hash=GENESIS_HASH)
        )


@both_encoders
@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "a\x00b"},
        {"detail": {"k": "\x00"}},
        {"detail": {"k\x00": 1}},
        {"detail": {"k": ["ok", {"deep": "\x00"}]}},
        {"detail": {"x": float("nan")}},
        {"time": datetime(2026, 12, 6)},  # naive
    ],
)
def test_values_postgresql_refuses_are_refused_up_front(
    encode: Encoder, overrides: dict[str, Any]
) -> None:
    # Such an event would be spooled, then block its chain's shipping forever.
    with pytest.raises(ValueError):
        encode(make_event(**overrides), chain_id="c", seq=1, prev_digest=bytes(32))


@both_encoders
def test_escaped_nul_text_is_not_a_nul(encode: Encoder) -> None:
    # The text "\\u0000" (a backslash, then u0000) is fine for PostgreSQL: only a real NUL
    # is refused, although both look alike in the JSON the refusal check scans first.
    event = make_event(client_id="a\\u0000b", peer_address="\\u0000", detail={"k": "\\u0000"})
    payload, _, row = encode(event, chain_id="c", seq=1, prev_digest=bytes(32))
    assert row[COLUMNS.index("client_id")] == "a\\u0000b"
    assert row[COLUMNS.index("detail")] == '{"k":"\\\\u0000"}'
    assert decode_payload(payload) == row


@both_encoders
def test_rows_hold_no_objects_the_gc_tracks(encode: Encoder) -> None:
    # Every spooled row waits in memory until PostgreSQL commits it: rows of atoms (str,
    # int, datetime) drop out of the GC's generations instead of being walked by every
    # collection while they wait.
    event = make_event()
    _, _, row = encode(event, chain_id="c", seq=1, prev_digest=bytes(32))
    assert [type(v).__name__ for v in row if gc.is_tracked(v)] == []
    assert [type(v) for v in row[3:6]] == [str, str, str]  # plain text, not enum members
    assert row[COLUMNS.index("id")] == str(event.id)
