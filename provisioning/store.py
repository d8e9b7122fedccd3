# ruff: noqa: S608 - f-strings here only splice constant column lists; values are $n.
"""All SQL of the provisioning service: tokens, devices, certificates, admin keys, NOTIFY.

Functions take a connection (or pool proxy) and never open transactions themselves: the
caller (`provisioning.enrollment.service`) decides what is atomic. Rows come back as schema models.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from provisioning import eventlog
from provisioning.errors import NotFound, TokenRejected
from provisioning.eventlog import ChainHead, EventSpec
from provisioning.tokens import REFUSAL_REASON, token_state
from schemas.api import AdminKeyInfo, CertificateInfo, DeviceInfo, TokenInfo
from schemas.events import AuthEvent, Reason
from schemas.notify import EVENTS_CHANNEL, REVOCATION_CHANNEL, RevocationNotice

Connection = Any
"""An asyncpg connection or pool proxy (asyncpg ships no type information)."""

# --- tokens ----------------------------------------------------------------------------

_TOKEN_COLUMNS = (
    "id, fleet, uses_allowed, uses_left, allow_reenroll, note, created_at, expires_at, "
    "revoked_at, default_attributes, now() AS now"
)


def _token_info(row: asyncpg.Record) -> TokenInfo:
    return TokenInfo(
        id=row["id"],
        fleet=row["fleet"],
        uses_allowed=row["uses_allowed"],
        uses_left=row["uses_left"],
        allow_reenroll=row["allow_reenroll"],
        note=row["note"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        attributes=json.loads(row["default_attributes"]),
        state=token_state(
            revoked_at=row["revoked_at"],
            uses_left=row["uses_left"],
            expires_at=row["expires_at"],
            now=row["now"],
        ),
    )


async def insert_token(
    conn: Connection,
    *,
    token_hash: bytes,
    fleet: str,
    uses: int,
    ttl: timedelta,
    note: str | None,
    allow_reenroll: bool,
    attributes: dict[str, str] | None = None,
) -> TokenInfo:
    """Store a token (and its fleet, when new); ``attributes`` are set on each device it
    enrolls (schemas/sql/0009_policies.sql)."""
    await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet)
    row = await conn.fetchrow(
        f"""INSERT INTO bootstrap_tokens
                (id, token_hash, fleet, uses_allowed, uses_left, allow_reenroll, note, expires_at,
                 default_attributes)
            VALUES ($1, $2, $3, $4, $4, $5, $6, now() + $7::interval, $8::jsonb)
            RETURNING {_TOKEN_COLUMNS}""",
        uuid.uuid4(),
        token_hash,
        fleet,
        uses,
        allow_reenroll,
        note,
        ttl,
        json.dumps(attributes or {}),
    )
    return _token_info(row)


async def list_tokens(conn: Connection, *, fleet: str | None = None) -> list[TokenInfo]:
    rows = await conn.fetch(
        f"""SELECT {_TOKEN_COLUMNS} FROM bootstrap_tokens
            WHERE $1::text IS NULL OR fleet = $1 ORDER BY created_at DESC, id""",
        fleet,
    )
    return [_token_info(row) for row in rows]


async def get_token(conn: Connection, token_id: uuid.UUID) -> TokenInfo:
    row = await conn.fetchrow(
        f"SELECT {_TOKEN_COLUMNS} FROM bootstrap_tokens WHERE id = $1", token_id
    )
    if row is None:
        raise NotFound(f"no token {token_id}")
    return _token_info(row)


async def revoke_token(conn: Connection, token_id: uuid.UUID) -> TokenInfo:
    """Revoke a token (idempotent: an already revoked token keeps its revocation time)."""
    row = await conn.fetchrow(
        f"""UPDATE bootstrap_tokens SET revoked_at = coalesce(revoked_at, now())
            WHERE id = $1 RETURNING {_TOKEN_COLUMNS}""",
        token_id,
    )
    if row is None:
        raise NotFound(f"no token {token_id}")
    return _token_info(row)


@dataclass(frozen=True, slots=True)
class UsableToken:
    """What enrollment needs to know about a token it may use."""

    id: uuid.UUID
    fleet: str
    allow_reenroll: bool


async def _refuse_token(conn: Connection, token_hash: bytes) -> TokenRejected:
    row = await conn.fetchrow(
        f"SELECT {_TOKEN_COLUMNS} FROM bootstrap_tokens WHERE token_hash = $1", token_hash
    )
    if row is None:
        return TokenRejected("unknown bootstrap token", reason=Reason.TOKEN_INVALID)
    state = _token_info(row).state
    if state == "active":  # a use was freed between the two statements: still refuse
        state = "exhausted"
    return TokenRejected(
        f"bootstrap token is {state}",
        reason=REFUSAL_REASON[state],
        token_id=str(row["id"]),
        fleet=row["fleet"],
    )


async def peek_token(conn: Connection, token_hash: bytes) -> UsableToken:
    """The token if it is usable right now, without spending a use (fails fast, no lock).

    Raises:
        TokenRejected: with reason token_invalid/expired/exhausted/revoked.
    """
    row = await conn.fetchrow(
        """SELECT id, fleet, allow_reenroll FROM bootstrap_tokens
           WHERE token_hash = $1 AND uses_left > 0 AND revoked_at IS NULL AND expires_at > now()""",
        token_hash,
    )
    if row is None:
        raise await _refuse_token(conn, token_hash)
    return UsableToken(row["id"], row["fleet"], row["allow_reenroll"])


async def consume_token(conn: Connection, token_hash: bytes) -> UsableToken:
    """Spend one use in one atomic statement; call inside the enrollment transaction.

    Raises:
        TokenRejected: with reason token_invalid/expired/exhausted/revoked.
    """
    row = await conn.fetchrow(
        """UPDATE bootstrap_tokens SET uses_left = uses_left - 1
           WHERE token_hash = $1 AND uses_left > 0 AND revoked_at IS NULL AND expires_at > now()
           RETURNING id, fleet, allow_reenroll""",
        token_hash,
    )
    if row is None:
        raise await _refuse_token(conn, token_hash)
    return UsableToken(row["id"], row["fleet"], row["allow_reenroll"])


async def enroll_new_device(
    conn: Connection,
    *,
    token_hash: bytes,
    device_id: str,
    hardware_id: str | None,
    cert: NewCertificate,
) -> UsableToken:
    """Spend a token use, insert the device and its certificate: one atomic statement.

    The device and certificate rows are inserted only from the token row the UPDATE
    returned, so nothing is written when no use is left. Call inside the enrollment's
    transaction or savepoint.

    Raises:
        TokenRejected: the token cannot be used (reason token_invalid/expired/...).
        asyncpg.UniqueViolationError: the hardware id is taken.
    """
    row = await conn.fetchrow(
        """WITH token AS (
               UPDATE bootstrap_tokens SET uses_left = uses_left - 1
               WHERE token_hash = $1 AND uses_left > 0 AND revoked_at IS NULL
                     AND expires_at > now()
               RETURNING id, fleet, allow_reenroll
           ), device AS (
               INSERT INTO devices (device_id, fleet, hardware_id, token_id)
               SELECT $2, fleet, $3, id FROM token
               RETURNING device_id
           ), certificate AS (
               INSERT INTO certificates
                   (serial, device_id, fingerprint_sha256, not_before, not_after, key_type, pem)
               SELECT $4, device_id, $5, $6, $7, $8, $9 FROM device
               RETURNING serial
           )
           SELECT token.id, token.fleet, token.allow_reenroll, certificate.serial
           FROM token LEFT JOIN certificate ON true""",
        token_hash,
        device_id,
        hardware_id,
        cert.serial,
        cert.fingerprint_sha256,
        cert.not_before,
        cert.not_after,
        cert.key_type,
        cert.pem,
    )
    if row is None:
        raise await _refuse_token(conn, token_hash)
    assert row["serial"] == cert.serial
    return UsableToken(row["id"], row["fleet"], row["allow_reenroll"])


_HEAD_MOVED = "devicegate: provisioning chain head moved; token"

# One statement, hence its own transaction when run outside one: either every device of the
# batch is enrolled and its event appended, or nothing is written (see the guard).
_ENROLL_CHAINED = f"""
WITH token AS (
    UPDATE bootstrap_tokens SET uses_left = uses_left - $2
    WHERE token_hash = $1 AND uses_left >= $2 AND revoked_at IS NULL AND expires_at > now()
    RETURNING id, fleet
), head AS (
    UPDATE event_chains SET seq = $4, hash = $5, updated_at = now()
    WHERE chain_id = $3 AND seq = $6 AND hash = $7 AND EXISTS (SELECT FROM token)
    RETURNING seq
), device AS (
    INSERT INTO devices (device_id, fleet, hardware_id, token_id)
    SELECT d.device_id, token.fleet, NULL, token.id
    FROM token, head, unnest($10::text[]) AS d(device_id)
    RETURNING device_id
), certificate AS (
    INSERT INTO certificates
        (serial, device_id, fingerprint_sha256, not_before, not_after, key_type, pem)
    SELECT c.serial, c.device_id, c.fingerprint, c.not_before, c.not_after, c.key_type, c.pem
    FROM unnest($11::text[], $10::text[], $12::text[], $13::timestamptz[], $14::timestamptz[],
                $15::text[], $16::text[])
        AS c(serial, device_id, fingerprint, not_before, not_after, key_type, pem)
    JOIN device USING (device_id)
    RETURNING serial
), inserted AS (
    {eventlog.insert_events_sql(17, gate="EXISTS (SELECT FROM head)")}
), notified AS (
    SELECT pg_notify($8, note) FROM head, unnest($9::text[]) AS note
)
SELECT (SELECT count(*) FROM notified) AS notified,
    -- Uses spent but the head had moved: fail the statement, so that they are not spent.
    -- (The text comes from a row, so the planner cannot fold the cast into an error.)
    CASE WHEN EXISTS (SELECT FROM token) AND NOT EXISTS (SELECT FROM head)
         THEN CAST((SELECT '{_HEAD_MOVED} ' || id::text FROM token LIMIT 1) AS integer)
    END AS guard
"""


async def enroll_new_devices_chained(
    conn: Connection,
    *,
    token_hash: bytes,
    certs: Sequence[NewCertificate],
    specs: Sequence[EventSpec],
    expect: ChainHead,
) -> list[AuthEvent] | None:
    """Enroll several new devices (no hardware id) with one token and append their events,
    in one statement: all of it, or nothing.

    The token must have a use for every device (else nothing is spent: the caller then
    enrolls them one by one, `enroll_new_device`, to refuse exactly the ones left over), and
    the provisioning chain's head must still be ``expect`` (the events are chained onto it;
    if it moved, the statement fails after the token's row was locked and changes nothing).
    Lock order as everywhere: the token row first, the chain head last. Run it outside a
    transaction (it is one) or at the start of one that is rolled back on None.

    Returns:
        The events as stored, or None when nothing was written.
    """
    events = eventlog.chain_events(specs, expect)
    last = events[-1]
    try:
        notified = await conn.fetchval(
            _ENROLL_CHAINED,
            token_hash,
            len(certs),
            eventlog.CHAIN_ID,
            last.seq,
            last.hash,
            expect.seq,
            expect.hash,
            EVENTS_CHANNEL,
            eventlog.event_notes(events),
            [c.device_id for c in certs],
            [c.serial for c in certs],
            [c.fingerprint_sha256 for c in certs],
            [c.not_before for c in certs],
            [c.not_after for c in certs],
            [c.key_type for c in certs],
            [c.pem for c in certs],
            *eventlog.event_arrays(events),
        )
    except asyncpg.InvalidTextRepresentationError as exc:
        if _HEAD_MOVED in str(exc):
            return None  # the statement failed: nothing of it was written
        raise
    return events if notified == len(events) else None


# --- devices ---------------------------------------------------------------------------

_DEVICE_COLUMNS = "device_id, fleet, hardware_id, status, created_at, updated_at"


def _device_info(row: asyncpg.Record) -> DeviceInfo:
    return DeviceInfo(**{key: row[key] for key in DeviceInfo.model_fields})


async def find_device_by_hardware_id(
    conn: Connection, hardware_id: str, *, lock: bool = False
) -> DeviceInfo | None:
    row = await conn.fetchrow(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE hardware_id = $1"
        + (" FOR UPDATE" if lock else ""),
        hardware_id,
    )
    return None if row is None else _device_info(row)


async def get_device(conn: Connection, device_id: str, *, lock: bool = False) -> DeviceInfo:
    row = await conn.fetchrow(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = $1"
        + (" FOR UPDATE" if lock else ""),
        device_id,
    )
    if row is None:
        raise NotFound(f"no device {device_id}")
    return _device_info(row)


async def list_devices(
    conn: Connection, *, fleet: str | None = None, status: str | None = None, limit: int = 1000
) -> list[DeviceInfo]:
    rows = await conn.fetch(
        f"""SELECT {_DEVICE_COLUMNS} FROM devices
            WHERE ($1::text IS NULL OR fleet = $1) AND ($2::text IS NULL OR status = $2)
            ORDER BY created_at DESC, device_id LIMIT $3""",
        fleet,
        status,
        limit,
    )
    return [_device_info(row) for row in rows]


async def set_device_status(conn: Connection, device_id: str, status: str) -> DeviceInfo:
    row = await conn.fetchrow(
        f"""UPDATE devices SET status = $2, updated_at = now() WHERE device_id = $1
            RETURNING {_DEVICE_COLUMNS}""",
        device_id,
        status,
    )
    if row is None:
        raise NotFound(f"no device {device_id}")
    return _device_info(row)


async def touch_device(conn: Connection, device_id: str) -> None:
    await conn.execute("UPDATE devices SET updated_at = now() WHERE device_id = $1", device_id)


# --- certificates ----------------------------------------------------------------------

_CERT_COLUMNS = (
    "serial, device_id, fingerprint_sha256, not_before, not_after, status, revoked_at, key_type"
)


def _certificate_info(row: asyncpg.Record) -> CertificateInfo:
    return CertificateInfo(**{key: row[key] for key in CertificateInfo.model_fields})


@dataclass(frozen=True, slots=True)
class NewCertificate:
    serial: str
    device_id: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    key_type: str
    pem: str


async def insert_certificate(conn: Connection, cert: NewCertificate) -> None:
    await conn.execute(
        """INSERT INTO certificates
               (serial, device_id, fingerprint_sha256, not_before, not_after, key_type, pem)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        cert.serial,
        cert.device_id,
        cert.fingerprint_sha256,
        cert.not_before,
        cert.not_after,
        cert.key_type,
        cert.pem,
    )


async def certificate_by_fingerprint(
    conn: Connection, fingerprint_sha256: str
) -> CertificateInfo | None:
    row = await conn.fetchrow(
        f"SELECT {_CERT_COLUMNS} FROM certificates WHERE fingerprint_sha256 = $1",
        fingerprint_sha256,
    )
    return None if row is None else _certificate_info(row)


async def get_certificate(conn: Connection, serial: str, *, lock: bool = False) -> CertificateInfo:
    row = await conn.fetchrow(
        f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = $1"
        + (" FOR UPDATE" if lock else ""),
        serial,
    )
    if row is None:
        raise NotFound(f"no certificate {serial}")
    return _certificate_info(row)


async def list_certificates(
    conn: Connection,
    *,
    device_id: str | None = None,
    status: str | None = None,
    limit: int = 1000,
) -> list[CertificateInfo]:
    rows = await conn.fetch(
        f"""SELECT {_CERT_COLUMNS} FROM certificates
            WHERE ($1::text IS NULL OR device_id = $1) AND ($2::text IS NULL OR status = $2)
            ORDER BY issued_at DESC, serial LIMIT $3""",
        device_id,
        status,
        limit,
    )
    return [_certificate_info(row) for row in rows]


async def supersede_certificate(conn: Connection, serial: str) -> bool:
    """Mark an active certificate superseded; false when it no longer is active (a race)."""
    row = await conn.fetchrow(
        "UPDATE certificates SET status = 'superseded' WHERE serial = $1 AND status = 'active' "
        "RETURNING serial",
        serial,
    )
    return row is not None


async def revoke_certificate(conn: Connection, serial: str, reason: str) -> bool:
    """Revoke an active or superseded certificate; false when it was already revoked."""
    row = await conn.fetchrow(
        """UPDATE certificates SET status = 'revoked', revoked_at = now(), revocation_reason = $2
           WHERE serial = $1 AND status <> 'revoked' RETURNING serial""",
        serial,
        reason,
    )
    return row is not None


async def revoke_device_certificates(conn: Connection, device_id: str, reason: str) -> list[str]:
    """Revoke every unrevoked certificate of a device; returns their serials."""
    rows = await conn.fetch(
        """UPDATE certificates SET status = 'revoked', revoked_at = now(), revocation_reason = $2
           WHERE device_id = $1 AND status <> 'revoked' RETURNING serial""",
        device_id,
        reason,
    )
    return [row["serial"] for row in rows]


async def revoked_serials(conn: Connection) -> list[tuple[str, datetime]]:
    """``(serial, revoked_at)`` of every revoked certificate, for the CRL."""
    rows = await conn.fetch(
        "SELECT serial, revoked_at FROM certificates WHERE status = 'revoked' ORDER BY serial"
    )
    return [(row["serial"], row["revoked_at"]) for row in rows]


# --- admin keys ------------------------------------------------------------------------


def _admin_key_info(row: asyncpg.Record) -> AdminKeyInfo:
    return AdminKeyInfo(**{key: row[key] for key in AdminKeyInfo.model_fields})


async def insert_admin_key(conn: Connection, *, name: str, key_hash: bytes) -> AdminKeyInfo:
    row = await conn.fetchrow(
        """INSERT INTO admin_keys (id, name, key_hash) VALUES ($1, $2, $3)
           RETURNING id, name, created_at, revoked_at""",
        uuid.uuid4(),
        name,
        key_hash,
    )
    return _admin_key_info(row)


async def list_admin_keys(conn: Connection) -> list[AdminKeyInfo]:
    rows = await conn.fetch(
        "SELECT id, name, created_at, revoked_at FROM admin_keys ORDER BY created_at, name"
    )
    return [_admin_key_info(row) for row in rows]


async def revoke_admin_key(conn: Connection, id_or_name: str) -> AdminKeyInfo:
    try:
        key_id: uuid.UUID | None = uuid.UUID(id_or_name)
    except ValueError:
        key_id = None
    row = await conn.fetchrow(
        """UPDATE admin_keys SET revoked_at = coalesce(revoked_at, now())
           WHERE id = $1 OR name = $2 RETURNING id, name, created_at, revoked_at""",
        key_id,
        id_or_name,
    )
    if row is None:
        raise NotFound(f"no admin key {id_or_name}")
    return _admin_key_info(row)


async def admin_key_name(conn: Connection, key_hash: bytes) -> str | None:
    """The name of the unrevoked admin key with this hash, if any."""
    name: str | None = await conn.fetchval(
        "SELECT name FROM admin_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    return name


# --- notifications ---------------------------------------------------------------------


async def notify_revocation(conn: Connection, notice: RevocationNotice) -> None:
    """Queue a revocation notice; PostgreSQL delivers it only if the transaction commits."""
    await conn.execute("SELECT pg_notify($1, $2)", REVOCATION_CHANNEL, notice.model_dump_json())
