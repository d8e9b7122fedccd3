"""Device certificates encoded from a precomputed DER template, signed with the raw CA key.

Why: ``x509.CertificateBuilder`` costs ~4x the ECDSA signature itself (Python extension
objects, validation, re-encoding of constant parts on every call), and issuance is on the
enrollment hot path. Everything that is the same for every device certificate of one
issuing CA (version, signature algorithm, issuer, basic constraints, EKU, key usage, AKI,
CRL distribution points) is encoded once; per certificate only serial, validity, subject,
key, SAN and SKI are.

Invariants:
- The template produces exactly the TBSCertificate that `CertificateAuthority`'s builder
  path produces for the same inputs (same fields, same order, same string types). This is
  not assumed: `LeafTemplate.verify` compares both, byte for byte, for each key class
  before the template is used for it, and the caller falls back to the builder on any
  difference (a newer ``cryptography`` that encodes differently, say).
- Inputs the template does not cover (a non-ASCII SAN URI, a date outside 1950-9999)
  return None, and the caller uses the builder, which accepts or refuses them as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

__all__ = [
    "LeafTemplate",
    "key_class",
    "signature_algorithm_of",
    "signed_der",
    "spki_der",
    "subject_key_id",
]

_SEQUENCE = 0x30
_SET = 0x31
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_UTF8_STRING = 0x0C
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_URI = 0x86  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String
_EXTENSIONS = 0xA3  # [3] EXPLICIT

_VERSION_3 = bytes.fromhex("a003020102")
_CRITICAL = bytes.fromhex("0101ff")
_OID_CN = bytes.fromhex("0603550403")
_OID_OU = bytes.fromhex("060355040b")
_OID_SAN = bytes.fromhex("0603551d11")
_OID_SKI = bytes.fromhex("0603551d0e")


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _integer(value: int) -> bytes:
    """A non-negative INTEGER, minimal two's complement."""
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _time(value: datetime) -> bytes | None:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime after; whole seconds."""
    utc = value.astimezone(UTC) if value.tzinfo is not None else value
    rest = f"{utc.month:02d}{utc.day:02d}{utc.hour:02d}{utc.minute:02d}{utc.second:02d}Z"
    if 1950 <= utc.year < 2050:
        return _tlv(_UTC_TIME, f"{utc.year % 100:02d}{rest}".encode())
    if utc.year <= 9999:
        return _tlv(_GENERALIZED_TIME, f"{utc.year:04d}{rest}".encode())
    return None


def _extension(oid: bytes, value: bytes, *, critical: bool = False) -> bytes:
    return _tlv(_SEQUENCE, oid + (_CRITICAL if critical else b"") + _tlv(_OCTET_STRING, value))


def _read_tlv(data: bytes, offset: int) -> tuple[int, int]:
    """(start of content, end of element) of the DER element at ``offset``."""
    first = data[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    count = first & 0x7F
    length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    start = offset + 2 + count
    return start, start + length


def subject_key_id(spki: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1, as ``cryptography`` computes it: SHA-1 of the
    subjectPublicKey BIT STRING's value (without its unused-bits octet)."""
    start, _ = _read_tlv(spki, 0)  # SubjectPublicKeyInfo
    _, algorithm_end = _read_tlv(spki, start)  # AlgorithmIdentifier
    bits_start, bits_end = _read_tlv(spki, algorithm_end)  # BIT STRING
    return hashlib.sha1(spki[bits_start + 1 : bits_end]).digest()  # noqa: S324 (an identifier)


def key_class(public_key: object) -> str:
    """The part of a device key that changes constant template parts: the key usage."""
    return "rsa" if isinstance(public_key, rsa.RSAPublicKey) else "signing"


class LeafTemplate:
    """The constant DER of one issuing CA's device certificates.

    Args:
        signature_algorithm: the DER AlgorithmIdentifier of the CA's signatures.
        issuer: the DER Name of the issuing CA (its certificate's subject).
        basic_constraints, extended_key_usage, authority_key_id: DER extension values.
        key_usage: DER KeyUsage value per `key_class`.
        crl_distribution_points: DER CRLDistributionPoints value, or None for none.
        sign: signs TBSCertificate bytes with the issuing CA's key.
    """

    def __init__(
        self,
        *,
        signature_algorithm: bytes,
        issuer: bytes,
        basic_constraints: bytes,
        key_usage: dict[str, bytes],
        extended_key_usage: bytes,
        authority_key_id: bytes,
        crl_distribution_points: bytes | None = None,
        sign: Callable[[bytes], bytes],
    ) -> None:
        self._algorithm_issuer = signature_algorithm + issuer
        self._signature_algorithm = signature_algorithm
        self._sign = sign
        bc = _extension(bytes.fromhex("0603551d13"), basic_constraints, critical=True)
        eku = _extension(bytes.fromhex("0603551d25"), extended_key_usage)
        # AKI then the CRL distribution points close the list, in the builder's order.
        self._last_extensions = _extension(bytes.fromhex("0603551d23"), authority_key_id)
        if crl_distribution_points is not None:
            self._last_extensions += _extension(
                bytes.fromhex("0603551d1f"), crl_distribution_points
            )
        # BasicConstraints, KeyUsage, EKU: in the builder's order, ahead of SAN and SKI.
        self._first_extensions = {
            kind: bc + _extension(bytes.fromhex("0603551d0f"), value, critical=True) + eku
            for kind, value in key_usage.items()
        }
        self.verified: dict[str, bool] = {}
        """Per `key_class`: whether the template reproduced the builder's certificate
        (absent: not compared yet). The CA uses the template only where this is True."""

    def tbs(
        self,
        *,
        serial: int,
        not_before: datetime,
        not_after: datetime,
        device_id: str,
        fleet: str,
        spiffe_id: str,
        spki: bytes,
        kind: str,
    ) -> bytes | None:
        """The DER TBSCertificate, or None when the template does not cover the input."""
        start, end = _time(not_before), _time(not_after)
        if start is None or end is None or not spiffe_id.isascii() or serial <= 0:
            return None
        subject = _tlv(
            _SEQUENCE,
            _tlv(_SET, _tlv(_SEQUENCE, _OID_CN + _tlv(_UTF8_STRING, device_id.encode())))
            + _tlv(_SET, _tlv(_SEQUENCE, _OID_OU + _tlv(_UTF8_STRING, fleet.encode()))),
        )
        san = _extension(_OID_SAN, _tlv(_SEQUENCE, _tlv(_URI, spiffe_id.encode())))
        ski = _extension(_OID_SKI, _tlv(_OCTET_STRING, subject_key_id(spki)))
        extensions = self._first_extensions[kind] + san + ski + self._last_extensions
        return _tlv(
            _SEQUENCE,
            _VERSION_3
            + _integer(serial)
            + self._algorithm_issuer
            + _tlv(_SEQUENCE, start + end)
            + subject
            + spki
            + _tlv(_EXTENSIONS, _tlv(_SEQUENCE, extensions)),
        )

    def certificate(self, tbs: bytes) -> bytes:
        """The signed certificate (DER) over ``tbs``."""
        return signed_der(tbs, self._signature_algorithm, self._sign(tbs))


def signed_der(tbs: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    """``SEQUENCE { tbs, signatureAlgorithm, BIT STRING signature }``: the shape of a signed
    certificate and of a signed CRL alike (RFC 5280 4.1 and 5.1)."""
    return _tlv(_SEQUENCE, tbs + signature_algorithm + _tlv(_BIT_STRING, b"\x00" + signature))


def spki_der(
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey,
) -> bytes:
    """The DER SubjectPublicKeyInfo of a device key."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signature_algorithm_of(certificate_der: bytes) -> bytes:
    """The DER signatureAlgorithm of a certificate (the element after its TBSCertificate)."""
    start, _ = _read_tlv(certificate_der, 0)
    _, tbs_end = _read_tlv(certificate_der, start)
    _, algorithm_end = _read_tlv(certificate_der, tbs_end)
    return certificate_der[tbs_end:algorithm_end]
