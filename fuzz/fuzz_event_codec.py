"""atheris harness for the auth event encoder: the C accelerator against the Python encoder.

The rule, for any event the bytes describe (any text in any field, any JSON-ish detail,
any time zone and year): where ``gateway.events._codec.encode`` gives a result, it is the
Python encoder's result byte for byte; where it raises, the Python encoder raises the same
error type; where it declines (returns None), the Python encoder decides alone. On top of
that, a successful encoding hashes exactly `schemas.events.canonical_bytes` of the chained
event, and its spool payload decodes back to the same COPY row.

Atheris instruments Python code only, so it steers by the Python encoder's branches; the
C side is checked by the comparison. Run: ``bash fuzz/run.sh 60 fuzz_event_codec``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from gateway.events._codec import encode as encode_c
    from gateway.events.codec import decode_payload, encode_event_python
    from schemas.events import AuthEvent, EventType, Outcome, Reason, canonical_bytes, uuid7

_TEXT_FIELDS = (
    "device_id", "fleet", "cert_serial", "cert_fingerprint", "client_id", "peer_address",
    "tls_version", "tls_cipher",
)  # fmt: skip


def json_value(fdp: Any, depth: int) -> Any:
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 12))  # past 64 bits too
    if kind == 3:
        return fdp.ConsumeFloat()  # NaN and infinities included: both must refuse them
    if kind in (4, 5):
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 12))
    if kind == 6:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7:
        return tuple(json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 2)))
    return json_object(fdp, depth + 1)


def json_object(fdp: Any, depth: int) -> dict[Any, Any]:
    return {
        (fdp.ConsumeInt(2) if fdp.ConsumeProbability() < 0.05 else fdp.ConsumeUnicode(6)):
        json_value(fdp, depth)
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    }  # fmt: skip


def moment(fdp: Any) -> datetime:
    zone = fdp.ConsumeIntInRange(0, 3)
    tz = None if zone == 0 else UTC if zone < 3 else timezone(
        timedelta(minutes=fdp.ConsumeIntInRange(-1439, 1439))
    )  # fmt: skip
    return datetime(
        fdp.ConsumeIntInRange(1, 9999), fdp.ConsumeIntInRange(1, 12),
        fdp.ConsumeIntInRange(1, 28), fdp.ConsumeIntInRange(0, 23),
        fdp.ConsumeIntInRange(0, 59), fdp.ConsumeIntInRange(0, 59),
        fdp.ConsumeIntInRange(0, 999_999), tzinfo=tz,
    )  # fmt: skip


def outcome_of(encode: Any, *args: Any) -> Any:
    try:
        return encode(*args)
    except Exception as exc:  # the error type is the outcome compared
        return type(exc)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    event = AuthEvent.model_construct(  # no validation: the encoders must cope on their own
        id=uuid7(),
        time=moment(fdp),
        instance=fdp.ConsumeUnicode(8),
        type=fdp.PickValueInList(list(EventType)),
        outcome=fdp.PickValueInList(list(Outcome)),
        reason=fdp.PickValueInList(list(Reason)),
        detail=json_object(fdp, 0),
        **{name: fdp.ConsumeUnicode(10) if fdp.ConsumeBool() else None for name in _TEXT_FIELDS},
    )
    chain_id = fdp.ConsumeUnicode(6)
    seq = fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))  # past 64 bits and below 0 too
    prev = fdp.ConsumeBytes(32).ljust(32, b"\0")

    fast = outcome_of(encode_c, event.__dict__, chain_id, seq, prev)
    slow = outcome_of(
        lambda: encode_event_python(event, chain_id=chain_id, seq=seq, prev_digest=prev)
    )
    if fast is None:  # declined: the Python encoder decides alone
        return
    assert fast == slow, (fast, slow)
    if isinstance(slow, type):
        return
    payload, digest, row = slow
    linked = event.model_copy(update={"chain_id": chain_id, "seq": seq})
    assert payload[64:] == canonical_bytes(linked)
    assert payload[:32] == prev and payload[32:64] == digest
    assert decode_payload(payload) == row


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
