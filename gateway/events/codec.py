"""The auth event's bytes in the spool and its row for PostgreSQL: chaining, encoding, decoding.

The sink's hot path (`gateway.events.sink.SpoolSink` encodes every event here, once).

Invariants:
- `encode_event` hashes exactly `schemas.events.canonical_bytes` of the chained event (a test
  compares them), so both planes and `devicegate audit verify` agree on every hash.
- The spool keeps ``prev_digest || digest || canonical JSON``; `decode_payload` rebuilds the
  COPY row from it exactly, so a replayed event is the event that was hashed.
- `encode_event` runs the C accelerator (``gateway/events/_codec.c``, built on install when a
  compiler is there) and falls back to `encode_event_python` for what the accelerator
  leaves to it, or when it is not built; both give the same bytes (a test compares them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from schemas.events import COLUMNS, AuthEvent, canonical_bytes, holds_nul

_Encoder = Callable[[dict[str, Any], str, int, bytes], tuple[bytes, bytes, tuple[Any, ...]] | None]
_encode_c: _Encoder | None
try:
    from gateway.events._codec import encode as _encode_c
except ImportError:  # built without a C compiler: the Python path does all of it
    _encode_c = None

__all__ = ["ACCELERATED", "COLUMNS", "Row", "decode_payload", "encode_event", "encode_event_python"]

ACCELERATED = _encode_c is not None
"""Whether `encode_event` has its C accelerator (the gateway warns at start when not)."""


Row = tuple[Any, ...]

# The C encoder json.dumps itself uses (sort_keys, compact, ensure_ascii=False), built once:
# json.dumps builds one per call, which costs more than the encoding of a small event.
# allow_nan=False: PostgreSQL's jsonb refuses NaN, and an event it refuses would block the
# chain's shipping forever; `record` raises ValueError for it instead.
_json_chunks = c_make_encoder(None, None, encode_basestring, None, ":", ",", True, False, False)
_TEXT_FIELDS = (
    "instance", "device_id", "fleet", "cert_serial", "cert_fingerprint", "client_id",
    "peer_address", "tls_version", "tls_cipher",
)  # fmt: skip


def _json(value: Any) -> str:
    return "".join(_json_chunks(value, 0))


_CACHE_MAX = 4096
_encoded: dict[str | None, str] = {None: "null"}
_stamps: dict[tuple[int, int, int, int, int, int], str] = {}


def _text(value: str | None) -> str:
    """JSON of a string field, memoised: instance, fleet, type, reason... repeat a lot."""
    try:
        return _encoded[value]
    except KeyError:
        assert value is not None
        text: str = encode_basestring(value)
        if len(_encoded) < _CACHE_MAX:
            _encoded[value] = text
        return text


def _stamp(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` as `schemas.events` writes it, the seconds memoised."""
    key = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    prefix = _stamps.get(key)
    if prefix is None:
        if len(_stamps) >= _CACHE_MAX:
            _stamps.clear()
        prefix = _stamps[key] = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{prefix}.{moment.microsecond:06d}Z"


def encode_event(
    event: AuthEvent, *, chain_id: str, seq: int, prev_digest: bytes
) -> tuple[bytes, bytes, Row]:
    """Chain ``event`` after ``prev_digest``: see `encode_event_python`, which this is, in C
    for the common case (UTC time, a detail of str/int/bool/None/dict/list)."""
    if _encode_c is not None:
        encoded = _encode_c(event.__dict__, chain_id, seq, prev_digest)
        if encoded is not None:
            return encoded
    return encode_event_python(event, chain_id=chain_id, seq=seq, prev_digest=prev_digest)


def encode_event_python(
    event: AuthEvent, *, chain_id: str, seq: int, prev_digest: bytes
) -> tuple[bytes, bytes, Row]:
    """Chain ``event`` after ``prev_digest``.

    Returns:
        (spool payload, sha256 digest, COPY row). The payload is ``prev_digest || digest ||
        canonical bytes``: the canonical JSON is what is hashed, so it is also what the
        spool keeps, and a recovered payload rebuilds the row exactly.

    Raises:
        ValueError: a value PostgreSQL would refuse (NaN in detail, NUL in a string), or a
            naive time.

    The sink's hot path: the canonical JSON is `schemas.events.canonical_bytes` of the
    chained event byte for byte (a test checks it), keys written in sorted order by hand,
    without copying the model.
    """
    values = event.__dict__  # pydantic keeps field values here; read only
    moment: datetime = values["time"]
    if moment.tzinfo is None:
        raise ValueError("event time must be timezone-aware")
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    detail = _json(values["detail"]) if values["detail"] else "{}"
    event_id = str(values["id"])
    if moment.year < 1000:  # isoformat pads the year, strftime does not: use the reference
        linked = event.model_copy(update={"chain_id": chain_id, "seq": seq})
        text = canonical_bytes(linked).decode()
    else:
        known = _encoded
        cert_fingerprint, cert_serial, client_id, device_id, fleet, instance = (
            values["cert_fingerprint"], values["cert_serial"], values["client_id"],
            values["device_id"], values["fleet"], values["instance"],
        )  # fmt: skip
        outcome, peer_address, reason, tls_cipher, tls_version, type_ = (
            values["outcome"], values["peer_address"], values["reason"],
            values["tls_cipher"], values["tls_version"], values["type"],
        )  # fmt: skip
        text = (
            f'{{"cert_fingerprint":{known.get(cert_fingerprint) or _text(cert_fingerprint)},'
            f'"cert_serial":{known.get(cert_serial) or _text(cert_serial)},'
            f'"chain_id":{known.get(chain_id) or _text(chain_id)},'
            f'"client_id":{known.get(client_id) or _text(client_id)},"detail":{detail},'
            f'"device_id":{known.get(device_id) or _text(device_id)},'
            f'"fleet":{known.get(fleet) or _text(fleet)},"id":"{event_id}",'
            f'"instance":{known.get(instance) or _text(instance)},'
            f'"outcome":{known.get(outcome) or _text(outcome)},'
            f'"peer_address":{known.get(peer_address) or _text(peer_address)},'
            f'"reason":{known.get(reason) or _text(reason)},"seq":{seq},'
            f'"time":"{_stamp(moment)}",'
            f'"tls_cipher":{known.get(tls_cipher) or _text(tls_cipher)},'
            f'"tls_version":{known.get(tls_version) or _text(tls_version)},'
            f'"type":{known.get(type_) or _text(type_)}}}'
        )
    # JSON writes a NUL as \u0000, so one scan of the text finds every candidate; the
    # exact check runs only then. PostgreSQL text cannot hold NUL: such an event could
    # never be shipped.
    if "\\u0000" in text and holds_nul([values[name] for name in ("detail", *_TEXT_FIELDS)]):
        raise ValueError("event fields must not contain NUL characters")
    body = text.encode()
    hasher = hashlib.sha256(prev_digest)  # = schemas.events.chain_hash, without a re-encode
    hasher.update(body)
    digest = hasher.digest()
    row = (  # the id as text: a row of str, int and datetime is not tracked by the GC
        event_id, values["time"], values["instance"], str(values["type"]),
        str(values["outcome"]), str(values["reason"]), values["device_id"], values["fleet"],
        values["cert_serial"], values["cert_fingerprint"], values["client_id"],
        values["peer_address"], values["tls_version"], values["tls_cipher"], detail, chain_id,
        seq, prev_digest.hex(), digest.hex(),
    )  # fmt: skip
    return prev_digest + digest + body, digest, row


def decode_payload(payload: bytes) -> Row:
    """The COPY row of a spooled payload (see `encode_event`)."""
    values = json.loads(payload[64:])
    return (
        values["id"], datetime.fromisoformat(values["time"]), values["instance"],
        values["type"], values["outcome"], values["reason"], values["device_id"],
        values["fleet"], values["cert_serial"], values["cert_fingerprint"],
        values["client_id"], values["peer_address"], values["tls_version"],
        values["tls_cipher"], _json(values["detail"]), values["chain_id"],
        values["seq"], payload[:32].hex(), payload[32:64].hex(),
    )  # fmt: skip
