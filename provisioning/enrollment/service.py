"""Enrollment and renewal: validate, authorize, sign, then record atomically.

Invariants:
- Reads that decide (token peek, hardware id, presented certificate) and signing (CPU) happen
  before any write. The writes of one request (token use, device, certificate, supersession)
  run in a savepoint of a group-committed transaction (`provisioning.enrollment.committer`) together
  with its chained event; a refusal inside rolls all of them back, the token use included.
  A new device's writes are one statement (`store.enroll_new_device`): the token use is the
  row that the device and certificate inserts select from. A batch of new devices without
  hardware ids on one token may be one statement with their events
  (`store.enroll_new_devices_chained`): it spends a use per device, or writes nothing.
- A caller learns of success only after COMMIT.
- Every refusal is recorded as a denied event, after the rollback of its writes. A renewal
  refusal names the certificate presented (``cert_serial``, ``cert_fingerprint`` and
  ``detail.presented``, `schemas.certificates`).
- The device row is locked (``FOR UPDATE``) before a renewal or re-enrollment touches its
  certificates, as revocation does, so a certificate cannot be issued to a device that a
  concurrent revocation has just revoked.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from provisioning import policies, store
from provisioning.enrollment import idevid as idevids
from provisioning.enrollment import manufacturers
from provisioning.enrollment.committer import Committer, Merge
from provisioning.enrollment.provisioners import Issuance, RenewalProvisioner, TokenProvisioner
from provisioning.errors import (
    CertificateRejected,
    DeviceRejected,
    HardwareIdTaken,
    IdevidRejected,
    TokenRejected,
)
from provisioning.eventlog import ChainHead, EventSpec
from provisioning.pki.ca import (
    CertificateAuthority,
    DeviceIdentity,
    SignOptions,
    der_to_pem,
    fingerprint,
    serial_hex,
)
from provisioning.pki.csr import AcceptedCsr
from provisioning.refusal_budget import RefusalBudget, RefusalSummary, budgets
from provisioning.telemetry import annotate, phase
from provisioning.tokens import TOKEN_PREFIX, secret_hash
from schemas.api import CertificateBundle, DeviceInfo
from schemas.certificates import describe_certificate, presented_detail
from schemas.errors import DevicegateError
from schemas.events import AuthEvent, EventType, Outcome, Reason
from schemas.notify import RevocationNotice
from schemas.settings import Settings

log = logging.getLogger(__name__)

TOKEN_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking, as the transport saw it."""

    address: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    certificate_der: bytes | None = None
    route: str | None = None
    """``"METHOD /path"`` of the request: its refusals count against that route's budget."""
    exporter: bytes | None = None
    """The connection's RFC 9266 tls-exporter value (TLS 1.3 only), for channel binding."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate just issued and recorded."""

    certificate: x509.Certificate
    bundle: CertificateBundle


class ProvisioningService:
    """The control plane's issuing operations over a connection pool and the issuing CA."""

    def __init__(self, *, pool: Any, ca: CertificateAuthority, settings: Settings) -> None:
        self.pool = pool
        self.ca = ca
        self.settings = settings
        self.enrollment = TokenProvisioner(settings)
        self.renewal = RenewalProvisioner(settings)
        self.committer = Committer(pool)
        self.refusals = RefusalBudget(budgets(settings))
        self._chain_pem = ca.chain_pem  # serialised once: it is in every response
        self._tokens: dict[bytes, store.UsableToken] = {}

    async def close(self) -> None:
        """Stop the committer and close the pool."""
        await self.committer.close()
        await self.pool.close()

    def _event(
        self, type: EventType, outcome: Outcome, reason: Reason, peer: Peer, **fields: Any
    ) -> EventSpec:
        return EventSpec(
            type=type,
            outcome=outcome,
            reason=reason,
            instance=self.settings.instance_id,
            peer_address=peer.address,
            tls_version=peer.tls_version,
            tls_cipher=peer.tls_cipher,
            **fields,
        )

    def _bundle(self, record: store.NewCertificate, issuance: Issuance) -> CertificateBundle:
        return CertificateBundle(
            device_id=issuance.identity.device_id,
            fleet=issuance.identity.fleet,
            serial=record.serial,
            certificate=record.pem,
            chain=self._chain_pem,
            not_before=record.not_before,
            not_after=record.not_after,
        )

    def _sign(
        self, csr: AcceptedCsr, issuance: Issuance
    ) -> tuple[x509.Certificate, store.NewCertificate]:
        certificate = self.ca.issue_device_certificate(
            csr.public_key, issuance.identity, issuance.options
        )
        der = certificate.public_bytes(serialization.Encoding.DER)  # once, for both below
        record = store.NewCertificate(
            serial=serial_hex(certificate.serial_number),
            device_id=issuance.identity.device_id,
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),  # as `ca.fingerprint`
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            key_type=csr.key_type,
            pem=der_to_pem(der),
        )
        return certificate, record

    # --- enrollment --------------------------------------------------------------------

    async def enroll(
        self, *, token: str, csr: AcceptedCsr, hardware_id: str | None, peer: Peer
    ) -> Issued:
        """Enroll a new device (or re-enroll its hardware) with a bootstrap token.

        Raises:
            TokenRejected, HardwareIdTaken, DeviceRejected: refusals, already recorded.
        """
        detail: dict[str, Any] = {"key_type": csr.key_type}
        if hardware_id is not None:
            detail["hardware_id"] = hardware_id
        known: dict[str, str | None] = {"device_id": None, "fleet": None}
        try:
            with phase("token_check"):
                if not token.startswith(TOKEN_PREFIX):
                    raise TokenRejected("not a devicegate bootstrap token")
                token_hash = secret_hash(token)
                usable, existing = await self._lookups(token_hash, hardware_id)
                known["fleet"] = usable.fleet
                detail["token_id"] = str(usable.id)
                if existing is not None:
                    known["device_id"] = existing.device_id
                issuance = self.enrollment.authorize(token=usable, existing=existing)
            known["device_id"] = issuance.identity.device_id
            annotate(device_id=known["device_id"], fleet=known["fleet"])
            with phase("signing"):
                certificate, record = self._sign(csr, issuance)

            def allowed(event_detail: dict[str, Any]) -> EventSpec:
                return self._event(
                    EventType.ENROLL,
                    Outcome.ALLOWED,
                    Reason.OK,
                    peer,
                    device_id=record.device_id,
                    fleet=issuance.identity.fleet,
                    cert_serial=record.serial,
                    cert_fingerprint=record.fingerprint_sha256,
                    detail=event_detail,
                )

            async def write(conn: Any) -> tuple[None, EventSpec]:
                event_detail = dict(detail)
                if issuance.reenroll:
                    await store.consume_token(conn, token_hash)
                    event_detail["reenroll"] = True
                    event_detail["revoked"] = await self._reenroll(conn, hardware_id, issuance)
                    await store.insert_certificate(conn, record)
                else:
                    await self._enroll_new(conn, token_hash, hardware_id, record)
                return None, allowed(event_detail)

            # A new device without a hardware id is one statement that refuses (token) only
            # before writing: no savepoint needed, and a batch of them on one token can be
            # one statement with their events. Otherwise a unique violation or a refusal
            # after a write must roll back to the item's savepoint.
            simple = not issuance.reenroll and hardware_id is None
            merge = (
                Merge(
                    key=("enroll", token_hash),
                    payload=(token_hash, record),
                    result=None,
                    spec=allowed(dict(detail)),
                    run=self._enroll_merged,
                )
                if simple
                else None
            )
            with phase("storing"):
                await self.committer.submit(write, savepoint=not simple, merge=merge)
        except DevicegateError as exc:
            if isinstance(exc, TokenRejected):
                self._tokens.pop(secret_hash(token), None)
            if isinstance(exc, TokenRejected) and exc.token_id is not None:
                detail["token_id"] = exc.token_id
                known["fleet"] = exc.fleet
            annotate(device_id=known["device_id"], fleet=known["fleet"])
            await self.record_denied(
                EventType.ENROLL,
                exc,
                peer,
                device_id=known["device_id"],
                fleet=known["fleet"],
                detail=detail,
            )
            raise
        return Issued(certificate, self._bundle(record, issuance))

    async def _lookups(
        self, token_hash: bytes, hardware_id: str | None
    ) -> tuple[store.UsableToken, DeviceInfo | None]:
        """The token (usable a moment ago) and the device already holding the hardware id.

        A token that was usable is remembered (a factory line enrolls many devices with one):
        the fleet it names never changes, and whether a use is left is decided again, atomically,
        when it is spent. A refusal forgets it, so a dead token costs no signing twice.
        """
        usable = self._tokens.get(token_hash)
        if usable is not None and hardware_id is None:
            return usable, None
        async with self.pool.acquire() as conn:
            if usable is None:
                usable = await store.peek_token(conn, token_hash)
                self._tokens[token_hash] = usable
                while len(self._tokens) > TOKEN_CACHE_SIZE:
                    self._tokens.pop(next(iter(self._tokens)))
            existing = (
                await store.find_device_by_hardware_id(conn, hardware_id)
                if hardware_id is not None
                else None
            )
        return usable, existing

    @staticmethod
    async def _enroll_merged(
        conn: Any, payloads: list[Any], specs: list[EventSpec], expect: ChainHead
    ) -> list[AuthEvent] | None:
        """`Merge.run` for new devices without a hardware id: payloads are (token hash,
        certificate record), one token hash (it is the merge key)."""
        return await store.enroll_new_devices_chained(
            conn,
            token_hash=payloads[0][0],
            certs=[record for _, record in payloads],
            specs=specs,
            expect=expect,
        )

    async def _enroll_new(
        self, conn: Any, token_hash: bytes, hardware_id: str | None, record: store.NewCertificate
    ) -> None:
        try:
            await store.enroll_new_device(
                conn,
                token_hash=token_hash,
                device_id=record.device_id,
                hardware_id=hardware_id,
                cert=record,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "devices_hardware_id_key":
                raise HardwareIdTaken("hardware id is already enrolled") from None
            raise

    async def _reenroll(self, conn: Any, hardware_id: str | None, issuance: Issuance) -> list[str]:
        """Revoke the earlier certificates of re-enrolled hardware; the device keeps its id."""
        assert hardware_id is not None
        device = await store.find_device_by_hardware_id(conn, hardware_id, lock=True)
        if device is None or device.device_id != issuance.identity.device_id:
            raise HardwareIdTaken("hardware id changed owner during enrollment")
        if device.status == "revoked":
            raise DeviceRejected("device was revoked", reason=Reason.DEVICE_REVOKED)
        serials = await store.revoke_device_certificates(conn, device.device_id, "reenrolled")
        for serial in serials:
            await store.notify_revocation(
                conn,
                RevocationNotice(
                    kind="certificate", device_id=device.device_id, serial=serial, status="revoked"
                ),
            )
        await store.touch_device(conn, device.device_id)
        return serials

    # --- enrollment by manufacturer certificate (IDevID) --------------------------------

    async def enroll_idevid(self, *, csr: AcceptedCsr, peer: Peer, via: str) -> Issued:
        """Enroll (or re-enroll) the device whose IDevID the TLS client presented.

        The device id is derived from the fleet and the IDevID's public key
        (`idevid.device_id_for`): the same hardware gets the same id, its earlier
        certificates are superseded (live sessions on them are handed over, as on renewal).

        Raises:
            IdevidRejected, DeviceRejected: refusals, already recorded.
        """
        detail: dict[str, Any] = {"key_type": csr.key_type, "via": via}
        known: dict[str, str | None] = {
            "device_id": None, "fleet": None, "cert_serial": None, "cert_fingerprint": None,
        }  # fmt: skip
        try:
            with phase("idevid_check"):
                if peer.certificate_der is None:
                    raise IdevidRejected(
                        "a bootstrap token or a manufacturer certificate (IDevID) is required",
                        reason=Reason.NO_CLIENT_CERTIFICATE,
                    )
                presented = idevids.describe(peer.certificate_der)
                detail["idevid"] = presented.detail()
                known["cert_serial"] = presented.serial
                known["cert_fingerprint"] = presented.fingerprint
                now = datetime.now(UTC)
                async with self.pool.acquire() as conn:
                    valid = idevids.trusting(presented, await manufacturers.load_trust(conn), now)
                    found = await manufacturers.listings(
                        conn, sorted({t.fleet for t in valid}), presented
                    )
                trust = idevids.choose_fleet(presented, valid, found)
                known["fleet"] = trust.fleet
                detail["ca_fingerprint"] = trust.ca_fingerprint
                attributes = found.get(trust.fleet, idevids.Listing()).attributes
                if attributes:
                    detail["attributes"] = attributes
                detail["channel_binding"] = idevids.check_channel_binding(
                    csr.challenge_password,
                    peer.exporter if peer.tls_version == "TLSv1.3" else None,
                    required=trust.require_channel_binding,
                    idevid=presented,
                    fleet=trust.fleet,
                )
                device_id = idevids.device_id_for(trust.fleet, presented.spki_sha256)
                known["device_id"] = device_id
                issuance = Issuance(
                    DeviceIdentity(device_id, trust.fleet, self.settings.trust_domain),
                    SignOptions.starting_now(
                        validity=self.settings.cert_validity,
                        backdate=self.settings.cert_backdate,
                        now=now,
                    ),
                )
            annotate(device_id=device_id, fleet=trust.fleet)
            with phase("signing"):
                certificate, record = self._sign(csr, issuance)

            async def write(conn: Any) -> tuple[None, EventSpec]:
                device = await manufacturers.ensure_device(
                    conn, device_id=device_id, trust=trust, idevid=presented
                )
                if device.status != "active":
                    reason = (
                        Reason.DEVICE_REVOKED if device.status == "revoked"
                        else Reason.DEVICE_DISABLED
                    )  # fmt: skip
                    raise DeviceRejected(f"device {device_id} is {device.status}", reason=reason)
                if attributes:  # the manifest's model/site/line: policy variables
                    await policies.apply_enrollment_attributes(conn, device_id, attributes)
                superseded = await manufacturers.supersede_active(conn, device_id)
                await store.insert_certificate(conn, record)
                await store.touch_device(conn, device_id)
                return None, self._event(
                    EventType.ENROLL,
                    Outcome.ALLOWED,
                    Reason.OK,
                    peer,
                    device_id=device_id,
                    fleet=trust.fleet,
                    cert_serial=record.serial,
                    cert_fingerprint=record.fingerprint_sha256,
                    detail={**detail, "superseded": superseded},
                )

            with phase("storing"):
                await self.committer.submit(write)
        except DevicegateError as exc:
            if isinstance(exc, IdevidRejected):
                if exc.idevid is not None:
                    detail["idevid"] = exc.idevid
                known["fleet"] = known["fleet"] or exc.fleet
            annotate(device_id=known["device_id"], fleet=known["fleet"])
            await self.record_denied(EventType.ENROLL, exc, peer, detail=detail, **known)
            raise
        return Issued(certificate, self._bundle(record, issuance))

    # --- renewal -----------------------------------------------------------------------

    async def renew(self, *, csr: AcceptedCsr, peer: Peer, via: str = "renew") -> Issued:
        """Issue a new certificate for the identity of the presented (current) certificate.

        Raises:
            CertificateRejected, DeviceRejected: refusals, already recorded.
        """
        detail: dict[str, Any] = {"key_type": csr.key_type, "via": via}
        known: dict[str, str | None] = {
            "device_id": None,
            "fleet": None,
            "cert_serial": None,
            "cert_fingerprint": None,
        }
        try:
            with phase("certificate_check"):
                presented = self._verify_presented(peer)
                known["cert_serial"] = serial_hex(presented.serial_number)
                known["cert_fingerprint"] = fingerprint(presented)
                async with self.pool.acquire() as conn:
                    current = await store.certificate_by_fingerprint(conn, fingerprint(presented))
                    if current is None:
                        raise CertificateRejected(
                            "certificate was not issued by this service",
                            reason=Reason.DEVICE_UNKNOWN,
                        )
                    device = await store.get_device(conn, current.device_id)
                known["device_id"], known["fleet"] = device.device_id, device.fleet
                issuance = self.renewal.authorize(certificate=current, device=device)
            annotate(device_id=device.device_id, fleet=device.fleet)
            with phase("signing"):
                certificate, record = self._sign(csr, issuance)

            async def write(conn: Any) -> tuple[None, EventSpec]:
                # Decide again on locked rows: a renewal or revocation may have won a race.
                locked_device = await store.get_device(conn, device.device_id, lock=True)
                locked = await store.get_certificate(conn, current.serial, lock=True)
                self.renewal.authorize(certificate=locked, device=locked_device)
                await store.supersede_certificate(conn, locked.serial)
                await store.insert_certificate(conn, record)
                await store.notify_revocation(
                    conn,
                    RevocationNotice(
                        kind="certificate",
                        device_id=device.device_id,
                        serial=locked.serial,
                        status="superseded",
                    ),
                )
                return None, self._event(
                    EventType.RENEW,
                    Outcome.ALLOWED,
                    Reason.OK,
                    peer,
                    device_id=device.device_id,
                    fleet=device.fleet,
                    cert_serial=record.serial,
                    cert_fingerprint=record.fingerprint_sha256,
                    detail={**detail, "previous_serial": locked.serial},
                )

            with phase("storing"):
                await self.committer.submit(write)
        except DevicegateError as exc:
            annotate(device_id=known["device_id"], fleet=known["fleet"])
            if peer.certificate_der is not None:  # which certificate was refused, in full
                named = describe_certificate(peer.certificate_der)
                detail["presented"] = presented_detail(named)
                known["cert_serial"] = known["cert_serial"] or named.serial
                known["cert_fingerprint"] = named.fingerprint
            await self.record_denied(EventType.RENEW, exc, peer, detail=detail, **known)
            raise
        return Issued(certificate, self._bundle(record, issuance))

    def _verify_presented(self, peer: Peer) -> x509.Certificate:
        """The TLS client certificate, checked to be signed by the issuing CA.

        The TLS layer verified the chain but skipped time checks (so that recently expired
        certificates can renew); validity is policy's job. This repeats the signature check
        so that nothing here depends on how the listener was configured.
        """
        if peer.certificate_der is None:
            raise CertificateRejected(
                "a client certificate is required", reason=Reason.NO_CLIENT_CERTIFICATE
            )
        try:
            presented = x509.load_der_x509_certificate(peer.certificate_der)
            presented.verify_directly_issued_by(self.ca.issuing)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateRejected(
                "client certificate was not issued by this CA", reason=Reason.UNKNOWN_ISSUER
            ) from None
        return presented

    # --- refusals ----------------------------------------------------------------------

    async def record_denied(
        self,
        type: EventType,
        exc: DevicegateError,
        peer: Peer,
        *,
        detail: dict[str, Any] | None = None,
        **fields: str | None,
    ) -> None:
        """Record a refusal (its own writes, if any, were rolled back already), or count it
        for a summary when its route's budget for this address is spent (`refusal_budget`)."""
        if not self.refusals.charge(
            peer.route,
            peer.address,
            type=type,
            reason=exc.reason,
            device_id=fields.get("device_id"),
        ):
            return
        spec = self._event(
            type,
            Outcome.DENIED,
            exc.reason,
            peer,
            detail={**(detail or {}), "message": str(exc)},
            **fields,
        )
        try:
            await self._submit(spec)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            # The refusal stands even when it cannot be recorded: on a budgeted route it is
            # counted for the next summary instead (none lost while the database is away).
            counted = self.refusals.unwritten(
                peer.route,
                peer.address,
                type=type,
                reason=exc.reason,
                device_id=fields.get("device_id"),
            )
            log.log(
                logging.WARNING if counted else logging.ERROR,
                "could not record a denied %s event%s",
                type,
                "; counted for the next refusal summary" if counted else "",
                exc_info=not counted,
            )

    async def record_refusal_summaries(self) -> int:
        """Write the refusals counted beyond their budget as summary events; how many.

        A summary that cannot be written (the database is away) is not dropped: it and the
        rest go back to the budget (`RefusalBudget.keep`) for the next sweep, and the error
        is raised for the sweeper to log.
        """
        summaries = self.refusals.sweep()
        written = 0
        try:
            for summary in summaries:
                await self._submit(self._summary_event(summary))
                written += 1
        except BaseException:
            self.refusals.keep(summaries[written:])
            raise
        return written

    def _summary_event(self, summary: RefusalSummary) -> EventSpec:
        method, _, path = summary.route.partition(" ")
        budget = self.refusals.table[summary.route]
        detail: dict[str, Any] = {
            "summary": True,
            "count": summary.count,
            "method": method,
            "path": path,
            "address": summary.address,
            "first": summary.first.isoformat(timespec="milliseconds"),
            "last": summary.last.isoformat(timespec="milliseconds"),
            "budget": {"events": budget.events, "per_seconds": budget.per},
        }
        if summary.devices:
            detail["devices"] = summary.devices
        if summary.other_devices:
            detail["other_devices"] = summary.other_devices
        return self._event(
            summary.type,
            Outcome.DENIED,
            summary.reason,
            Peer(address=summary.sample),
            device_id=summary.device_id,
            detail=detail,
        )

    async def _submit(self, spec: EventSpec) -> None:
        async def write(conn: Any) -> tuple[None, EventSpec]:
            return None, spec

        await self.committer.submit(write, savepoint=False)
