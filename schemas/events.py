"""Auth events: what was decided, and the canonical encoding that chains them.

Invariants:
- Both planes build the chain with `chain_hash` and `canonical_bytes` from this module, so a
  gateway worker's chain and the provisioning chain verify with the same code.
- ``hash = sha256(prev_hash || canonical_bytes(event))``; ``prev_hash`` of a chain's first
  event is `GENESIS_HASH`. The canonical encoding covers every field except ``hash`` itself
  (``prev_hash`` is covered through the concatenation).
- The canonical encoding only uses values PostgreSQL round-trips exactly (times at
  microsecond precision in UTC, JSON detail with sorted keys), so rows read back from the
  table hash to the value stored beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time as _time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EventType(StrEnum):
    TLS_HANDSHAKE = "tls_handshake"
    CONNECT = "connect"
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    SESSION_END = "session_end"
    SESSION_REVOKED = "session_revoked"
    SESSION_SUPERSEDED = "session_superseded"
    """A live session on a certificate its device just renewed, handed over (outcome
    allowed, reason ``certificate_superseded``): the device reconnects with the new one."""
    ENROLL = "enroll"
    RENEW = "renew"
    REVOKE = "revoke"
    DEVICE_DISABLE = "device_disable"
    DEVICE_ENABLE = "device_enable"
    TOKEN = "token"
    ADMIN = "admin"
    POLICY = "policy"
    """A change of policies, attachments, groups or device attributes (detail: actor,
    action, the new policy version and a diff), or its refusal."""
    AUDIT_PRUNE = "audit_prune"
    EVENTS_LOST = "events_lost"
    """A gateway worker's count of events it could not store (spool full)."""
    EVENTS_MISSING = "events_missing"
    """A gateway worker found, at start, that the database lacks events it had shipped
    (restored from an older backup): detail ``chain_id``, ``first_seq``, ``last_seq``."""


class Outcome(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


class Reason(StrEnum):
    """Why a decision went the way it did. Stable: operators alert and query on these."""

    OK = "ok"
    # TLS and certificate
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    UNKNOWN_ISSUER = "unknown_issuer"
    CERTIFICATE_INVALID = "certificate_invalid"
    CERTIFICATE_REVOKED = "certificate_revoked"
    CERTIFICATE_SUPERSEDED = "certificate_superseded"
    TLS_PROTOCOL_ERROR = "tls_protocol_error"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    PROXY_PROTOCOL_ERROR = "proxy_protocol_error"
    # device and session
    DEVICE_UNKNOWN = "device_unknown"
    DEVICE_DISABLED = "device_disabled"
    DEVICE_REVOKED = "device_revoked"
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    TOPIC_NOT_AUTHORIZED = "topic_not_authorized"
    PROTOCOL_ERROR = "protocol_error"
    UNSUPPORTED_PROTOCOL_VERSION = "unsupported_protocol_version"
    PACKET_TOO_LARGE = "packet_too_large"
    CONNECT_TIMEOUT = "connect_timeout"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    CONNECT_RATE_EXCEEDED = "connect_rate_exceeded"
    """A device's CONNECT beyond its connect budget (``DEVICE_CONNECTS_PER_MINUTE``,
    ``DEVICE_CONNECT_BURST``; ``detail.scope`` = ``device``), refused before the broker and
    any takeover; one event per device per window, ``detail.count`` refusals."""
    TOO_MANY_DENIALS = "too_many_denials"
    """A session closed for exceeding its denial budget (``DENIALS_PER_WINDOW``)."""
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_CLOSED = "upstream_closed"
    REVOCATION_STATE_STALE = "revocation_state_stale"
    EVENT_LOG_UNAVAILABLE = "event_log_unavailable"
    DATABASE_BEHIND_SPOOL = "database_behind_spool"
    SESSION_TAKEN_OVER = "session_taken_over"
    CLIENT_DISCONNECTED = "client_disconnected"
    CONNECTION_LOST = "connection_lost"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    # policy changes (re-judging live sessions)
    SUBSCRIPTION_REVOKED = "subscription_revoked"
    """A live subscription the new policy version forbids, removed at the broker."""
    SESSION_ENDED_BY_POLICY = "session_ended_by_policy"
    """A live session the new policy version no longer allows (client id, subscriptions)."""
    POLICY_NOT_LOADED = "policy_not_loaded"
    """The gateway has not loaded the database's policy yet: CONNECT refused (fail closed)."""
    # provisioning
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_EXHAUSTED = "token_exhausted"
    TOKEN_REVOKED = "token_revoked"
    CSR_INVALID = "csr_invalid"
    KEY_NOT_ALLOWED = "key_not_allowed"
    HARDWARE_ID_TAKEN = "hardware_id_taken"
    RENEWAL_WINDOW_CLOSED = "renewal_window_closed"
    SIGNER_UNAVAILABLE = "signer_unavailable"
    """The issuing CA's key could not sign (its PKCS#11 token is absent, locked or failing):
    nothing was issued."""
    # enrollment by manufacturer certificate (IDevID)
    IDEVID_UNTRUSTED = "idevid_untrusted"
    IDEVID_NOT_ALLOWLISTED = "idevid_not_allowlisted"
    IDEVID_BLOCKED = "idevid_blocked"
    IDEVID_EXPIRED = "idevid_expired"
    CHANNEL_BINDING_MISMATCH = "channel_binding_mismatch"
    UNAUTHORIZED = "unauthorized"
    ADMIN_ACTION = "admin_action"
    RETENTION = "retention"
    # HTTP API
    REQUEST_INVALID = "request_invalid"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    CONFLICT = "conflict"
    INTERNAL_ERROR = "internal_error"
    SERVICE_UNAVAILABLE = "service_unavailable"


GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first event of every chain."""

CHAINED_FIELDS = (
    "id",
    "time",
    "instance",
    "type",
    "outcome",
    "reason",
    "device_id",
    "fleet",
    "cert_serial",
    "cert_fingerprint",
    "client_id",
    "peer_address",
    "tls_version",
    "tls_cipher",
    "detail",
    "chain_id",
    "seq",
)
"""The fields an event's hash covers, in their canonical order."""
COLUMNS = (*CHAINED_FIELDS, "prev_hash", "hash")
"""``auth_events`` columns in the order every writer (COPY rows, INSERTs) uses."""


_uuid7_lock = threading.Lock()
_uuid7_last = (0, 0)  # (millis, rand_a) of this process's last clock-read uuid7


def uuid7(now_ns: int | None = None) -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit Unix milliseconds, then randomness.

    Read from the clock (no ``now_ns``), ids never go back within a process, even when the
    wall clock is stepped back (NTP, a resumed VM): a millisecond not after the last one
    reuses it and counts up in ``rand_a`` (RFC 9562 6.2, method 1), moving on to the next
    millisecond when the 12 bits run out. ``rand_b`` stays random, so ids are unique.
    """
    global _uuid7_last
    rand = int.from_bytes(os.urandom(10))
    if now_ns is not None:
        millis, rand_a = now_ns // 1_000_000, (rand >> 62) & 0xFFF
    else:
        # A new millisecond starts its count at a random value with the top bit clear,
        # leaving at least 2048 ids of room before it has to borrow the next millisecond.
        millis, rand_a = _time.time_ns() // 1_000_000, (rand >> 62) & 0x7FF
        with _uuid7_lock:
            last_millis, last_a = _uuid7_last
            if millis <= last_millis:
                millis, rand_a = last_millis, last_a + 1
                if rand_a > 0xFFF:
                    millis, rand_a = millis + 1, 0
            _uuid7_last = (millis, rand_a)
    value = (millis & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version
    value |= rand_a << 64
    value |= 0b10 << 62  # variant
    value |= rand & (2**62 - 1)  # rand_b
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    """Now, in UTC, at the microsecond precision PostgreSQL keeps."""
    return datetime.now(UTC)


class AuthEvent(BaseModel):
    """One authentication or authorisation decision, as stored and as served in JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: uuid.UUID = Field(default_factory=uuid7)
    time: datetime = Field(default_factory=utcnow)
    instance: str
    type: EventType
    outcome: Outcome
    reason: Reason
    device_id: str | None = None
    fleet: str | None = None
    cert_serial: str | None = None
    cert_fingerprint: str | None = None
    client_id: str | None = None
    peer_address: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    chain_id: str | None = None
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def chained(self, *, chain_id: str, seq: int, prev_hash: str) -> AuthEvent:
        """This event as the next link of a chain, with its hash computed."""
        linked = self.model_copy(update={"chain_id": chain_id, "seq": seq, "prev_hash": prev_hash})
        return linked.model_copy(update={"hash": chain_hash(prev_hash, linked)})


def _canonical_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("event time must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def holds_nul(value: Any) -> bool:
    """Whether a string anywhere in a JSON value (keys included) holds U+0000, which
    PostgreSQL's text and jsonb cannot store."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(key) or holds_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(holds_nul(item) for item in value)
    return False


def canonical_bytes(event: AuthEvent) -> bytes:
    """The exact bytes that are hashed for ``event``: sorted, compact JSON of its fields."""
    values: dict[str, Any] = {}
    for name in CHAINED_FIELDS:
        value = getattr(event, name)
        if isinstance(value, datetime):
            value = _canonical_time(value)
        elif isinstance(value, uuid.UUID):
            value = str(value)
        values[name] = value
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, event: AuthEvent) -> str:
    """``sha256(prev_hash || canonical event)`` as lowercase hex."""
    digest = hashlib.sha256(bytes.fromhex(prev_hash))
    digest.update(canonical_bytes(event))
    return digest.hexdigest()
