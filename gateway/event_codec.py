"""The auth event's bytes in the spool and its row for PostgreSQL: chaining, encoding, decoding.

The sink's hot path (`gateway.events.SpoolSink` encodes every event here, once).

Invariants:
- `encode_event` hashes exactly `schemas.events.canonical_bytes` of the chained event (a test
  compares them), so both planes and `devicegate audit verify` agree on every hash.
- The spool keeps ``prev_digest || digest || canonical JSON``; `decode_payload` rebuilds the
  COPY row from it exactly, so a replayed event is the event that was hashed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from schemas.events import AuthEvent, canonical_bytes

__all__ = ["COLUMNS", "Row", "decode_payload", "encode_event"]

COLUMNS = (
    "id", "time", "instance", "type", "outcome", "reason", "device_id", "fleet",
    "cert_serial", "cert_fingerprint", "client_id", "peer_address", "tls_version",
    "tls_cipher", "detail", "chain_id", "seq", "prev_hash", "hash",
)  # fmt: skip
"""auth_events columns in the order of the COPY rows built here."""

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


def _canonical(event: AuthEvent, chain_id: str, seq: int, detail: str) -> bytes:
    """`schemas.events.canonical_bytes` of ``event`` chained at (chain_id, seq), fast.

    The sink's hot path: byte-for-byte the same output (a test checks it against
    `canonical_bytes`), keys written in sorted order by hand, without copying the model.
    """
    values = event.__dict__  # pydantic keeps field values here; read only
    moment: datetime = values["time"]
    if moment.tzinfo is None:
        raise ValueError("event time must be timezone-aware")
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    if moment.year < 1000:  # isoformat pads the year, strftime does not: use the reference
        linked = event.model_copy(update={"chain_id": chain_id, "seq": seq})
        return canonical_bytes(linked)
    return (
        f'{{"cert_fingerprint":{_text(values["cert_fingerprint"])},'
        f'"cert_serial":{_text(values["cert_serial"])},"chain_id":{_text(chain_id)},'
        f'"client_id":{_text(values["client_id"])},"detail":{detail},'
        f'"device_id":{_text(values["device_id"])},"fleet":{_text(values["fleet"])},'
        f'"id":"{values["id"]}","instance":{_text(values["instance"])},'
        f'"outcome":{_text(values["outcome"])},"peer_address":{_text(values["peer_address"])},'
        f'"reason":{_text(values["reason"])},"seq":{seq},"time":"{_stamp(moment)}",'
        f'"tls_cipher":{_text(values["tls_cipher"])},'
        f'"tls_version":{_text(values["tls_version"])},"type":{_text(values["type"])}}}'
    ).encode()


def encode_event(
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
    """
    detail = _json(event.detail) if event.detail else "{}"
    values = event.__dict__
    if "\\u0000" in detail or any("\x00" in (values[name] or "") for name in _TEXT_FIELDS):
        # PostgreSQL text cannot hold NUL: such an event could never be shipped.
        raise ValueError("event fields must not contain NUL characters")
    body = _canonical(event, chain_id, seq, detail)
    hasher = hashlib.sha256(prev_digest)  # = schemas.events.chain_hash, without a re-encode
    hasher.update(body)
    digest = hasher.digest()
    row = (
        event.id, event.time, event.instance, str(event.type), str(event.outcome),
        str(event.reason), event.device_id, event.fleet, event.cert_serial,
        event.cert_fingerprint, event.client_id, event.peer_address, event.tls_version,
        event.tls_cipher, detail, chain_id, seq, prev_digest.hex(), digest.hex(),
    )  # fmt: skip
    return prev_digest + digest + body, digest, row


def decode_payload(payload: bytes) -> Row:
    """The COPY row of a spooled payload (see `encode_event`)."""
    values = json.loads(payload[64:])
    return (
        uuid.UUID(values["id"]), datetime.fromisoformat(values["time"]), values["instance"],
        values["type"], values["outcome"], values["reason"], values["device_id"],
        values["fleet"], values["cert_serial"], values["cert_fingerprint"],
        values["client_id"], values["peer_address"], values["tls_version"],
        values["tls_cipher"], _json(values["detail"]), values["chain_id"],
        values["seq"], payload[:32].hex(), payload[32:64].hex(),
    )  # fmt: skip
