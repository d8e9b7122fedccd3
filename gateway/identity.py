"""Device identity from a client certificate.

Invariants:

* The certificate is read from the DER the TLS layer verified; the chain (and its
  validity period) has already been checked by OpenSSL for this connection, this module
  only reads who it speaks for. That reading is a pure function of the DER bytes and the
  trust domain, so it is cached (bounded LRU keyed by the exact bytes: devices reconnect
  with the same certificate); revocation and the notAfter timer stay per connection.
* Subject CN = device id, and exactly one SAN URI
  ``spiffe://<trust-domain>/fleet/<fleet>/device/<device-id>`` naming the same device in
  our trust domain; anything else is ``certificate_invalid``.
* Device ids and fleets are ``[a-z0-9][a-z0-9-]*``; a certificate naming anything else is
  refused here, so no wildcard or level separator ever reaches the topic policy.
* ``serial`` is lowercase hex without leading zeros (the registry's format);
  ``fingerprint`` is the SHA-256 of the DER, lowercase hex; ``not_after`` (UTC) is when
  the certificate, and so any session on it, ends; ``der`` is the certificate itself
  (the cache's own key, not a copy), for a refusal that names what was presented.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from schemas.errors import DevicegateError
from schemas.events import Reason

__all__ = ["DeviceIdentity", "IdentityError", "identity_from_der"]

_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
_SPIFFE: Final = re.compile(r"spiffe://([^/]+)/fleet/([^/]+)/device/([^/]+)")


class IdentityError(DevicegateError):
    """The certificate verified but does not name a device of ours correctly."""

    reason = Reason.CERTIFICATE_INVALID


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a connection's certificate speaks for."""

    device_id: str
    fleet: str
    serial: str
    fingerprint: str
    not_after: datetime | None = None
    der: bytes = field(default=b"", compare=False, repr=False)


_CACHED_CERTIFICATES: Final = 1024  # about 1 MB at most: DER + identity per entry


def identity_from_der(der: bytes, *, trust_domain: str) -> DeviceIdentity:
    """Read the device identity of a verified client certificate (cached per DER).

    Args:
        der: The peer certificate, DER encoded.
        trust_domain: The SPIFFE trust domain our CA issues in.

    Returns:
        The identity (immutable; the same object for the same certificate).

    Raises:
        IdentityError: CN and SAN disagree, the SAN is missing, foreign or malformed
            (not cached: a refused certificate is read again each time).
    """
    return _identity(der, trust_domain)


@lru_cache(maxsize=_CACHED_CERTIFICATES)
def _identity(der: bytes, trust_domain: str) -> DeviceIdentity:
    """`identity_from_der` without the cache."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise IdentityError(f"unreadable certificate: {exc}") from None
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise IdentityError("certificate has no single subject CN")
    device_id = cns[0].value
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise IdentityError("certificate has no single SPIFFE URI SAN")
    match = _SPIFFE.fullmatch(spiffe[0])
    if match is None:
        raise IdentityError(f"malformed SPIFFE id {spiffe[0]!r}")
    domain, fleet, san_device = match.groups()
    if domain != trust_domain:
        raise IdentityError(f"SPIFFE id in trust domain {domain!r}, not {trust_domain!r}")
    if san_device != device_id:
        raise IdentityError(f"CN {device_id!r} does not match the SPIFFE id {spiffe[0]!r}")
    if _NAME.fullmatch(device_id) is None or _NAME.fullmatch(fleet) is None:
        raise IdentityError(f"device id {device_id!r} or fleet {fleet!r} is not a valid name")
    return DeviceIdentity(
        device_id=device_id,
        fleet=fleet,
        serial=format(cert.serial_number, "x"),
        fingerprint=hashlib.sha256(der).hexdigest(),
        not_after=cert.not_valid_after_utc,
        der=der,
    )
