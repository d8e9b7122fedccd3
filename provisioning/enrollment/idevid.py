"""Enrollment by manufacturer certificate (IEEE 802.1AR IDevID): path validation, the fleet
it belongs to, channel binding and the device id it becomes. Pure: no I/O.

Invariants:
- An IDevID is accepted only through a path the service builds itself: leaf, then any of
  the fleet's configured intermediates, then the fleet's manufacturer root, every link a
  signature by a CA certificate (basicConstraints CA, keyCertSign when keyUsage is present,
  pathLen respected). The chain the client sent is not used (Python's ssl before 3.13 does
  not expose it; configured intermediates make the trust decision the operator's alone).
- Every certificate of the path is within its validity at ``now`` (else ``idevid_expired``);
  the leaf is not a CA and its keyUsage, when present, has digitalSignature.
- A configured manufacturer CRL whose issuer is the leaf's issuer is applied (signature
  checked against the issuing certificate of the path); a listed serial is blocked.
- The device id is a function of the fleet and the IDevID's public key (`device_id_for`),
  so the same hardware re-enrolls as the same device, whatever certificate the
  manufacturer reissued for that key.
- Channel binding (RFC 9266 ``tls-exporter``): the CSR's challengePassword, when present,
  must be base64 of the connection's exporter value; compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from provisioning.errors import IdevidRejected
from schemas.events import Reason

EXPORTER_LABEL = "EXPORTER-Channel-Binding"
"""RFC 9266 section 2: the tls-exporter label (empty context, 32 bytes)."""
EXPORTER_LENGTH = 32
MAX_INTERMEDIATES = 4
"""Longest path tried: leaf, at most this many intermediates, root."""


def spki_sha256(subject: x509.Certificate | Any) -> str:
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo of a certificate or public key."""
    key = subject.public_key() if isinstance(subject, x509.Certificate) else subject
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class Manufacturer:
    """A manufacturer CA one fleet trusts, as configured (`manufacturers.load_trust`)."""

    fleet: str
    ca_fingerprint: str
    root: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()
    require_allowlist: bool = False
    require_channel_binding: bool = False
    crl: x509.CertificateRevocationList | None = None


@dataclass(frozen=True, slots=True)
class Idevid:
    """The certificate presented, named the way events and manifests name it."""

    certificate: x509.Certificate
    issuer: str
    serial: str
    fingerprint: str
    spki_sha256: str

    def detail(self) -> dict[str, str]:
        """For ``detail.idevid`` of an event."""
        return {
            "issuer": self.issuer,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "spki_sha256": self.spki_sha256,
        }


def describe(der: bytes) -> Idevid:
    """Parse the presented certificate.

    Raises:
        IdevidRejected: not an X.509 certificate (idevid_untrusted).
    """
    try:
        certificate = x509.load_der_x509_certificate(der)
        issuer = certificate.issuer.rfc4514_string()
        spki = spki_sha256(certificate)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdevidRejected("the client certificate does not parse") from None
    return Idevid(
        certificate=certificate,
        issuer=issuer,
        serial=format(certificate.serial_number, "x"),
        fingerprint=hashlib.sha256(der).hexdigest(),
        spki_sha256=spki,
    )


def _extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(certificate: x509.Certificate, below: int) -> bool:
    """A CA that may sign with ``below`` intermediates under it."""
    constraints = _extension(certificate, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        return False
    if constraints.path_length is not None and below > constraints.path_length:
        return False
    usage = _extension(certificate, x509.KeyUsage)
    return usage is None or usage.key_cert_sign


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def build_path(leaf: x509.Certificate, trust: Manufacturer) -> list[x509.Certificate] | None:
    """leaf, intermediates..., root, or None when no path to ``trust.root`` verifies."""
    path = [leaf]
    current = leaf
    for depth in range(MAX_INTERMEDIATES + 1):
        if _issued_by(current, trust.root) and _is_ca(trust.root, depth):
            return [*path, trust.root]
        step = next(
            (
                candidate
                for candidate in trust.intermediates
                if candidate not in path
                and _issued_by(current, candidate)
                and _is_ca(candidate, depth)
            ),
            None,
        )
        if step is None:
            return None
        path.append(step)
        current = step
    return None


def _check_path(
    idevid: Idevid, path: list[x509.Certificate], trust: Manufacturer, now: datetime
) -> None:
    leaf = idevid.certificate
    detail = idevid.detail()
    for certificate in path:
        if certificate.not_valid_after_utc < now:
            what = "the IDevID" if certificate is leaf else certificate.subject.rfc4514_string()
            raise IdevidRejected(
                f"{what} expired at {certificate.not_valid_after_utc.isoformat()}",
                reason=Reason.IDEVID_EXPIRED, idevid=detail, fleet=trust.fleet,
            )  # fmt: skip
        if certificate.not_valid_before_utc > now:
            raise IdevidRejected(
                f"{certificate.subject.rfc4514_string()} is not valid before "
                f"{certificate.not_valid_before_utc.isoformat()}",
                reason=Reason.IDEVID_EXPIRED, idevid=detail, fleet=trust.fleet,
            )  # fmt: skip
    constraints = _extension(leaf, x509.BasicConstraints)
    usage = _extension(leaf, x509.KeyUsage)
    if (constraints is not None and constraints.ca) or (
        usage is not None and not usage.digital_signature
    ):
        raise IdevidRejected(
            "the IDevID is a CA certificate or its keyUsage lacks digitalSignature",
            idevid=detail, fleet=trust.fleet,
        )  # fmt: skip
    crl = trust.crl
    if crl is not None and crl.issuer == leaf.issuer:
        signed = crl.is_signature_valid(path[1].public_key())  # type: ignore[arg-type]
        if signed and crl.get_revoked_certificate_by_serial_number(leaf.serial_number):
            raise IdevidRejected(
                "the IDevID is revoked by its manufacturer's CRL",
                reason=Reason.IDEVID_BLOCKED, idevid=detail, fleet=trust.fleet,
            )  # fmt: skip


def trusting(idevid: Idevid, trusted: list[Manufacturer], now: datetime) -> list[Manufacturer]:
    """The trust entries (one per fleet) under which ``idevid`` validates.

    Raises:
        IdevidRejected: no configured CA issued it (idevid_untrusted), or a path exists but
            the IDevID (or a CA of its path) is out of validity (idevid_expired), not an end
            entity certificate for signing, or revoked by the manufacturer's CRL.
    """
    valid: list[Manufacturer] = []
    refusal: IdevidRejected | None = None
    for trust in trusted:
        path = build_path(idevid.certificate, trust)
        if path is None:
            continue
        try:
            _check_path(idevid, path, trust, now)
        except IdevidRejected as exc:
            refusal = refusal or exc
            continue
        valid.append(trust)
    if valid:
        return valid
    if refusal is not None:
        raise refusal
    raise IdevidRejected(
        f"no fleet trusts the issuer of this IDevID ({idevid.issuer})", idevid=idevid.detail()
    )


@dataclass(frozen=True, slots=True)
class Listing:
    """What the database says of one IDevID in one fleet."""

    listed: bool = False
    blocked: bool = False
    attributes: dict[str, str] | None = None


def choose_fleet(
    idevid: Idevid, valid: list[Manufacturer], listings: dict[str, Listing]
) -> Manufacturer:
    """The one trust entry (fleet) this IDevID enrolls under.

    A fleet that blocks it is out; a fleet that requires an allowlist is in only when its
    manifest lists it. A CA trusted by several fleets is only allowed when each requires an
    allowlist, so the manifests say whose a device is; one listed by two fleets is refused.

    Raises:
        IdevidRejected: idevid_blocked, or idevid_not_allowlisted.
    """
    detail = idevid.detail()
    blocked = [t for t in valid if listings.get(t.fleet, Listing()).blocked]
    open_ = [t for t in valid if t not in blocked]
    candidates = [
        t for t in open_ if not t.require_allowlist or listings.get(t.fleet, Listing()).listed
    ]
    if not candidates:
        if blocked:
            raise IdevidRejected(
                f"the IDevID is blocked in fleet {blocked[0].fleet}",
                reason=Reason.IDEVID_BLOCKED, idevid=detail, fleet=blocked[0].fleet,
            )  # fmt: skip
        fleet = valid[0].fleet
        raise IdevidRejected(
            f"fleet {fleet} requires its manifest to list this IDevID; it does not",
            reason=Reason.IDEVID_NOT_ALLOWLISTED, idevid=detail, fleet=fleet,
        )  # fmt: skip
    if len({t.fleet for t in candidates}) > 1:
        raise IdevidRejected(
            "the IDevID is listed by more than one fleet: "
            + ", ".join(sorted({t.fleet for t in candidates})),
            reason=Reason.IDEVID_NOT_ALLOWLISTED, idevid=detail,
        )  # fmt: skip
    return candidates[0]


def check_channel_binding(
    challenge: str | None, exporter: bytes | None, *, required: bool, idevid: Idevid, fleet: str
) -> bool:
    """Whether the CSR carried a channel binding (checked); refuse a wrong or missing one.

    ``exporter`` is the connection's tls-exporter value (None: not TLS 1.3, or unavailable).

    Raises:
        IdevidRejected: channel_binding_mismatch.
    """
    if challenge is None:
        if required:
            raise IdevidRejected(
                f"fleet {fleet} requires a tls-exporter channel binding in the CSR's "
                "challengePassword",
                reason=Reason.CHANNEL_BINDING_MISMATCH, idevid=idevid.detail(), fleet=fleet,
            )  # fmt: skip
        return False
    try:
        presented = base64.b64decode(challenge.strip(), validate=True)
    except (binascii.Error, ValueError):
        presented = b""
    if exporter is None or not hmac.compare_digest(presented, exporter):
        raise IdevidRejected(
            "the CSR's channel binding is not this TLS 1.3 connection's tls-exporter value",
            reason=Reason.CHANNEL_BINDING_MISMATCH, idevid=idevid.detail(), fleet=fleet,
        )  # fmt: skip
    return True


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def device_id_for(fleet: str, spki_hex: str) -> str:
    """``<fleet>-i<19 base32 characters>``: 95 bits of SHA-256("devicegate idevid" || fleet
    || SPKI hash). Stable for one key in one fleet; the ``i`` tells it from a token's
    random ``<fleet>-<12 characters>``."""
    digest = hashlib.sha256(
        b"devicegate idevid\0" + fleet.encode() + b"\0" + bytes.fromhex(spki_hex)
    )
    bits = int.from_bytes(digest.digest()[:12]) >> 1  # 95 bits
    return f"{fleet}-i" + "".join(_BASE32[(bits >> shift) & 31] for shift in range(90, -5, -5))
