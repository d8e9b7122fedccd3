"""CSR policy: what a certificate signing request must be before anything is signed.

Invariants:
- The only things taken from a CSR are its public key, its proof of possession (the
  signature) and its challengePassword (for RFC 9266 channel binding of IDevID enrollment,
  `provisioning.enrollment.idevid`). The requested subject and extensions are ignored: the
  service assigns identity.
- Every failure is `CsrInvalid` or `KeyNotAllowed`; nothing else escapes `parse_csr`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import AttributeOID

from provisioning.errors import CsrInvalid
from provisioning.pki.ca import DevicePublicKey, KeyNotAllowed, key_type_name

MAX_CSR_BYTES = 16_384


@dataclass(frozen=True, slots=True)
class AcceptedCsr:
    """A CSR that passed policy: the key to certify, its type name, and the
    challengePassword attribute if it has one (at most `MAX_CHALLENGE` characters)."""

    public_key: DevicePublicKey
    key_type: str
    challenge_password: str | None = None


MAX_CHALLENGE = 256


def parse_csr_pem(text: str | bytes) -> AcceptedCsr:
    """Check a PEM CSR against policy.

    Raises:
        CsrInvalid: not a PEM CSR, or its signature does not verify.
        KeyNotAllowed: the key type or size is not certified.
    """
    data = text.encode() if isinstance(text, str) else text
    if not data.strip():
        raise CsrInvalid("empty CSR")
    if len(data) > MAX_CSR_BYTES:
        raise CsrInvalid(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise CsrInvalid("not a PEM PKCS#10 certificate signing request") from None
    return _check(csr)


def parse_csr_base64_der(body: bytes) -> AcceptedCsr:
    """Check an EST CSR (base64 of DER PKCS#10, line breaks allowed) against policy.

    Raises:
        CsrInvalid: not base64 DER PKCS#10, or its signature does not verify.
        KeyNotAllowed: the key type or size is not certified.
    """
    compact = b"".join(body.split())
    if not compact:
        raise CsrInvalid("empty CSR")
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CsrInvalid("the body is not base64") from None
    if len(der) > MAX_CSR_BYTES:
        raise CsrInvalid(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(der)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise CsrInvalid("not a DER PKCS#10 certificate signing request") from None
    return _check(csr)


def _check(csr: x509.CertificateSigningRequest) -> AcceptedCsr:
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise KeyNotAllowed("the CSR's public key type is not supported") from None
    key_type = key_type_name(public_key)  # raises KeyNotAllowed
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrInvalid("the CSR's signature does not verify (no proof of key possession)")
    assert isinstance(public_key, DevicePublicKey)  # key_type_name accepted it
    return AcceptedCsr(public_key=public_key, key_type=key_type, challenge_password=_challenge(csr))


def _challenge(csr: x509.CertificateSigningRequest) -> str | None:
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None
    except ValueError:
        raise CsrInvalid("the CSR's attributes do not parse") from None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise CsrInvalid("the CSR's challengePassword is not text") from None
    if len(text) > MAX_CHALLENGE:
        raise CsrInvalid(f"the CSR's challengePassword is longer than {MAX_CHALLENGE}")
    return text
