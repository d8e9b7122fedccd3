"""Manufacturer trust per fleet, IDevID manifests and blocks: the admin changes (each one
transaction with its auth event, ``detail.actor`` as in `provisioning.admin`) and the reads
enrollment makes (`load_trust`, `listings`, `ensure_device`).

Invariants:
- A CA (by the SHA-256 of its SPKI) is trusted by two fleets only when every fleet that
  trusts it requires an allowlist: then the manifests say which device is whose. The check
  holds a transaction-level advisory lock on the fingerprint, so two concurrent changes
  cannot both pass it.
- A manifest import is one transaction: COPY into a temporary staging table, then one
  ``INSERT ... ON CONFLICT`` into ``idevid_manifest``; a malformed row aborts all of it.
- An IDevID device's row is created once (``ON CONFLICT DO NOTHING`` on its derived id) and
  locked (``FOR UPDATE``) before its certificates are superseded, so concurrent
  enrollments of one IDevID, in one process or several, make exactly one device.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel

from provisioning import store
from provisioning.enrollment.idevid import Idevid, Listing, Manufacturer, build_path, spki_sha256
from provisioning.enrollment.manifest import Entry
from provisioning.errors import Conflict, NotFound, RequestInvalid
from provisioning.eventlog import append_event
from schemas.api import DeviceInfo
from schemas.events import EventType, Outcome, Reason
from schemas.notify import RevocationNotice

Connection = Any

COPY_CHUNK = 10_000


class ManufacturerInfo(BaseModel):
    fleet: str
    ca_fingerprint: str
    subject: str
    intermediates: int
    require_allowlist: bool
    require_channel_binding: bool
    crl: bool
    updated_at: datetime


class BlockInfo(BaseModel):
    fleet: str
    kind: str
    value: str
    note: str | None
    created_at: datetime


async def _event(
    conn: Connection, instance: str, actor: str, fleet: str, detail: dict[str, Any]
) -> None:
    await append_event(
        conn,
        instance=instance,
        type=EventType.ADMIN,
        outcome=Outcome.ALLOWED,
        reason=Reason.ADMIN_ACTION,
        fleet=fleet,
        detail={"actor": actor, **detail},
    )


# --- parsing what the operator gives ---------------------------------------------------


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """PEM (one or more) or DER certificates.

    Raises:
        RequestInvalid: neither.
    """
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise RequestInvalid(f"{what}: not a PEM or DER X.509 certificate") from None


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise RequestInvalid("--crl: not a PEM or DER X.509 CRL") from None


def check_manufacturer(
    root: x509.Certificate,
    intermediates: list[x509.Certificate],
    crl: x509.CertificateRevocationList | None,
) -> None:
    """A root that is a CA, intermediates that chain to it, a CRL signed by one of them.

    Raises:
        RequestInvalid: which of them is wrong.
    """
    try:
        constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise RequestInvalid("--ca: not a CA certificate (basicConstraints CA is not set)")
    trust = Manufacturer(fleet="", ca_fingerprint="", root=root, intermediates=tuple(intermediates))
    for intermediate in intermediates:
        if build_path(intermediate, trust) is None:
            raise RequestInvalid(
                f"--intermediate {intermediate.subject.rfc4514_string()}: no path to the CA"
            )
    if crl is not None and not any(
        crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        for issuer in (root, *intermediates)
    ):
        raise RequestInvalid("--crl: not signed by the CA or one of its intermediates")


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


# --- trust -----------------------------------------------------------------------------


async def trust_manufacturer(
    conn: Connection,
    *,
    fleet: str,
    root: x509.Certificate,
    intermediates: list[x509.Certificate],
    require_allowlist: bool,
    require_channel_binding: bool,
    crl: x509.CertificateRevocationList | None,
    actor: str,
    instance: str,
) -> ManufacturerInfo:
    """Trust (or re-configure) a manufacturer CA for ``fleet`` (created if new).

    Raises:
        RequestInvalid: the certificates or CRL do not fit together.
        Conflict: another fleet trusts the CA and not every such fleet requires an allowlist.
    """
    check_manufacturer(root, intermediates, crl)
    fingerprint = spki_sha256(root)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 8))", fingerprint)
        others = await conn.fetch(
            "SELECT fleet, require_allowlist FROM manufacturer_cas "
            "WHERE ca_fingerprint = $1 AND fleet <> $2 ORDER BY fleet",
            fingerprint,
            fleet,
        )
        if others and (not require_allowlist or not all(r["require_allowlist"] for r in others)):
            names = ", ".join(r["fleet"] for r in others)
            raise Conflict(
                f"CA {fingerprint[:16]}... is already trusted by fleet(s) {names}: a CA may be "
                "trusted by several fleets only when each requires an allowlist "
                "(--require-allowlist), so that manifests say which device is whose"
            )
        await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet)
        row = await conn.fetchrow(
            """INSERT INTO manufacturer_cas AS m
                   (fleet, ca_fingerprint, subject, pem, intermediates, require_allowlist,
                    require_channel_binding, crl_der)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (fleet, ca_fingerprint) DO UPDATE SET
                   subject = EXCLUDED.subject, pem = EXCLUDED.pem,
                   intermediates = EXCLUDED.intermediates,
                   require_allowlist = EXCLUDED.require_allowlist,
                   require_channel_binding = EXCLUDED.require_channel_binding,
                   crl_der = EXCLUDED.crl_der, updated_at = now()
               RETURNING (xmax = 0) AS created, updated_at""",
            fleet,
            fingerprint,
            root.subject.rfc4514_string(),
            _pem(root),
            [_pem(c) for c in intermediates],
            require_allowlist,
            require_channel_binding,
            crl.public_bytes(serialization.Encoding.DER) if crl is not None else None,
        )
        await _event(
            conn,
            instance,
            actor,
            fleet,
            {
                "action": "trust_manufacturer",
                "created": row["created"],
                "ca_fingerprint": fingerprint,
                "subject": root.subject.rfc4514_string(),
                "intermediates": [spki_sha256(c) for c in intermediates],
                "require_allowlist": require_allowlist,
                "require_channel_binding": require_channel_binding,
                "crl": crl is not None,
            },
        )
    return ManufacturerInfo(
        fleet=fleet,
        ca_fingerprint=fingerprint,
        subject=root.subject.rfc4514_string(),
        intermediates=len(intermediates),
        require_allowlist=require_allowlist,
        require_channel_binding=require_channel_binding,
        crl=crl is not None,
        updated_at=row["updated_at"],
    )


async def distrust_manufacturer(
    conn: Connection, *, fleet: str, ca_fingerprint: str, actor: str, instance: str
) -> None:
    """Stop trusting a CA in ``fleet``. Devices it enrolled keep their certificates (revoke
    them with ``devicegate device revoke``); it enrolls nothing more.

    Raises:
        NotFound: the fleet does not trust that CA.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "DELETE FROM manufacturer_cas WHERE fleet = $1 AND ca_fingerprint = $2 "
            "RETURNING subject",
            fleet,
            ca_fingerprint,
        )
        if row is None:
            raise NotFound(f"fleet {fleet} trusts no CA with SPKI fingerprint {ca_fingerprint}")
        await _event(
            conn,
            instance,
            actor,
            fleet,
            {
                "action": "distrust_manufacturer",
                "ca_fingerprint": ca_fingerprint,
                "subject": row["subject"],
            },
        )


async def list_manufacturers(
    conn: Connection, *, fleet: str | None = None
) -> list[ManufacturerInfo]:
    rows = await conn.fetch(
        """SELECT fleet, ca_fingerprint, subject, cardinality(intermediates) AS intermediates,
                  require_allowlist, require_channel_binding, crl_der IS NOT NULL AS crl,
                  updated_at
           FROM manufacturer_cas WHERE $1::text IS NULL OR fleet = $1
           ORDER BY fleet, subject""",
        fleet,
    )
    return [ManufacturerInfo(**dict(row)) for row in rows]


_PARSED: dict[tuple[str, str, datetime], Manufacturer] = {}
MAX_PARSED = 4096


async def load_trust(conn: Connection) -> list[Manufacturer]:
    """Every fleet's manufacturer trust, as of now (one query; parsed rows are cached by
    their ``updated_at``, so a change is seen by the next enrollment)."""
    rows = await conn.fetch(
        "SELECT fleet, ca_fingerprint, updated_at FROM manufacturer_cas ORDER BY fleet"
    )
    result = []
    for row in rows:
        key = (row["fleet"], row["ca_fingerprint"], row["updated_at"])
        trust = _PARSED.get(key)
        if trust is None:
            full = await conn.fetchrow(
                "SELECT * FROM manufacturer_cas WHERE fleet = $1 AND ca_fingerprint = $2",
                row["fleet"],
                row["ca_fingerprint"],
            )
            if full is None:  # distrusted meanwhile
                continue
            trust = Manufacturer(
                fleet=full["fleet"],
                ca_fingerprint=full["ca_fingerprint"],
                root=x509.load_pem_x509_certificate(full["pem"].encode()),
                intermediates=tuple(
                    x509.load_pem_x509_certificate(p.encode()) for p in full["intermediates"]
                ),
                require_allowlist=full["require_allowlist"],
                require_channel_binding=full["require_channel_binding"],
                crl=(
                    x509.load_der_x509_crl(full["crl_der"]) if full["crl_der"] is not None else None
                ),
            )
            if len(_PARSED) >= MAX_PARSED:
                _PARSED.clear()
            _PARSED[(full["fleet"], full["ca_fingerprint"], full["updated_at"])] = trust
        result.append(trust)
    return result


async def listings(conn: Connection, fleets: list[str], idevid: Idevid) -> dict[str, Listing]:
    """Per fleet: whether its manifest lists the IDevID (by serial or SPKI hash), its
    attributes, and whether the fleet blocks it."""
    rows = await conn.fetch(
        """SELECT fleet, 'listed' AS what, attributes FROM idevid_manifest
             WHERE fleet = ANY($1) AND ((kind = 'serial' AND value = $2)
                                     OR (kind = 'spki' AND value = $3))
           UNION ALL
           SELECT fleet, 'blocked', NULL FROM idevid_blocks
             WHERE fleet = ANY($1) AND ((kind = 'serial' AND value = $2)
                                     OR (kind = 'spki' AND value = $3))""",
        fleets,
        idevid.serial,
        idevid.spki_sha256,
    )
    found: dict[str, Listing] = {}
    for row in rows:
        before = found.get(row["fleet"], Listing())
        if row["what"] == "blocked":
            found[row["fleet"]] = Listing(before.listed, True, before.attributes)
        else:
            attrs = json.loads(row["attributes"]) if row["attributes"] else {}
            found[row["fleet"]] = Listing(
                True, before.blocked, {**(before.attributes or {}), **attrs}
            )
    return found


# --- manifests -------------------------------------------------------------------------


async def import_manifest(
    conn: Connection,
    *,
    fleet: str,
    entries: Iterable[Entry],
    source: str,
    actor: str,
    instance: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Load manifest entries into ``fleet``'s allowlist; (inserted, updated).

    ``progress`` is called with the number of entries staged so far, after each chunk.

    Raises:
        ManifestError: a malformed row (nothing is imported).
    """
    digest = hashlib.sha256()
    async with conn.transaction():
        await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet)
        await conn.execute(
            "CREATE TEMPORARY TABLE idevid_manifest_staging "
            "(kind text NOT NULL, value text NOT NULL, attributes jsonb NOT NULL) ON COMMIT DROP"
        )
        staged = 0
        chunk: list[tuple[str, str, str]] = []
        for entry in entries:
            chunk.append((entry.kind, entry.value, entry.attributes))
            digest.update(f"{entry.kind}:{entry.value}\n".encode())
            if len(chunk) >= COPY_CHUNK:
                await conn.copy_records_to_table("idevid_manifest_staging", records=chunk)
                staged += len(chunk)
                chunk = []
                if progress is not None:
                    progress(staged)
        if chunk:
            await conn.copy_records_to_table("idevid_manifest_staging", records=chunk)
            staged += len(chunk)
            if progress is not None:
                progress(staged)
        row = await conn.fetchrow(
            """WITH up AS (
                   INSERT INTO idevid_manifest AS m (fleet, kind, value, attributes)
                   SELECT $1, kind, value, attributes FROM idevid_manifest_staging
                   ORDER BY kind, value  -- key order: the primary key fills page by page
                   ON CONFLICT (fleet, kind, value) DO UPDATE
                       SET attributes = EXCLUDED.attributes, imported_at = now()
                   RETURNING (xmax = 0) AS inserted)
               SELECT count(*) FILTER (WHERE inserted) AS inserted,
                      count(*) FILTER (WHERE NOT inserted) AS updated FROM up""",
            fleet,
        )
        await _event(
            conn,
            instance,
            actor,
            fleet,
            {
                "action": "import_manifest",
                "source": source,
                "entries": staged,
                "inserted": row["inserted"],
                "updated": row["updated"],
                "sha256": digest.hexdigest(),
            },
        )
    return row["inserted"], row["updated"]


# --- blocks ----------------------------------------------------------------------------


async def block(
    conn: Connection, *, fleet: str, kind: str, value: str, note: str | None, actor: str,
    instance: str, unblock: bool = False,
) -> bool:  # fmt: skip
    """Block (or unblock) an IDevID in ``fleet`` by serial or SPKI hash; False: no change."""
    async with conn.transaction():
        if unblock:
            changed = await conn.fetchval(
                "DELETE FROM idevid_blocks WHERE fleet = $1 AND kind = $2 AND value = $3 "
                "RETURNING true",
                fleet, kind, value,
            )  # fmt: skip
        else:
            await conn.execute(
                "INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet
            )
            changed = await conn.fetchval(
                "INSERT INTO idevid_blocks (fleet, kind, value, note) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING RETURNING true",
                fleet, kind, value, note,
            )  # fmt: skip
        if not changed:
            return False
        await _event(
            conn,
            instance,
            actor,
            fleet,
            {"action": "unblock_idevid" if unblock else "block_idevid", kind: value},
        )
    return True


async def list_blocks(conn: Connection, *, fleet: str | None = None) -> list[BlockInfo]:
    rows = await conn.fetch(
        "SELECT fleet, kind, value, note, created_at FROM idevid_blocks "
        "WHERE $1::text IS NULL OR fleet = $1 ORDER BY fleet, created_at",
        fleet,
    )
    return [BlockInfo(**dict(row)) for row in rows]


# --- enrollment ------------------------------------------------------------------------


async def ensure_device(
    conn: Connection, *, device_id: str, trust: Manufacturer, idevid: Idevid
) -> DeviceInfo:
    """The IDevID's device, created on first enrollment, locked for this transaction."""
    created = await conn.fetchval(
        "INSERT INTO devices (device_id, fleet) VALUES ($1, $2) "
        "ON CONFLICT (device_id) DO NOTHING RETURNING true",
        device_id,
        trust.fleet,
    )
    if created:
        await conn.execute(
            """INSERT INTO device_idevids
                   (device_id, fleet, ca_fingerprint, issuer, serial, spki_sha256)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            device_id,
            trust.fleet,
            trust.ca_fingerprint,
            idevid.issuer,
            idevid.serial,
            idevid.spki_sha256,
        )
    device = await store.get_device(conn, device_id, lock=True)
    if device.fleet != trust.fleet:
        raise Conflict(f"device {device_id} belongs to fleet {device.fleet}")
    return device


async def supersede_active(conn: Connection, device_id: str) -> list[str]:
    """Supersede every active certificate of the device (the renewal's notice: gateways
    hand over live sessions on them); their serials."""
    rows = await conn.fetch(
        "UPDATE certificates SET status = 'superseded' "
        "WHERE device_id = $1 AND status = 'active' RETURNING serial",
        device_id,
    )
    serials = [row["serial"] for row in rows]
    for serial in serials:
        await store.notify_revocation(
            conn,
            RevocationNotice(
                kind="certificate", device_id=device_id, serial=serial, status="superseded"
            ),
        )
    return serials
