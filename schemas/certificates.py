"""The certificate a peer presented, as a refusal records it (``detail.presented``).

Both planes describe a presented certificate with `describe_certificate`, so a gateway's
``tls_handshake`` refusal and a provisioning ``renew`` refusal name a certificate the same
way, and ``devicegate audit`` and the console read one shape.

Invariants:

* Only the leaf, and only bounded fields of it: subject and issuer (RFC 4514) are device-
  chosen text, so control and format characters (NUL, ESC, bidi overrides...) are escaped
  as ``\\xNN`` / ``\\uNNNN`` (terminals, PostgreSQL's jsonb and the hash chain's encoder
  all take the result as is) and the string is cut to `MAX_NAME` characters, ending in
  ``...`` when cut. The serial is cut to `MAX_SERIAL` hex digits the same way (RFC 5280
  allows 20 octets, 40 digits).
* ``serial`` is lowercase hex without leading zeros and ``fingerprint`` the SHA-256 of the
  DER in lowercase hex: the formats of the ``cert_serial`` and ``cert_fingerprint`` fields.
* Bytes that do not parse as a certificate still get their fingerprint, and ``unparsed``
  says why; nothing here raises on device input.
"""

from __future__ import annotations

import hashlib
import unicodedata
import warnings
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from pydantic import BaseModel, ConfigDict

__all__ = [
    "MAX_NAME",
    "MAX_SERIAL",
    "PresentedCertificate",
    "describe_certificate",
    "presented_detail",
    "printable",
]

MAX_NAME: Final = 256
MAX_SERIAL: Final = 64
_CUT: Final = "..."
_CACHED: Final = 128  # at most 2 MiB of DER (the TLS accelerator keeps leaves up to 16 KiB)
_HIDDEN: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})  # control, format, ...


class PresentedCertificate(BaseModel):
    """The leaf certificate a peer presented (``detail.presented`` of a refusal)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    subject: str | None = None
    """RFC 4514 subject, escaped and bounded (see the module docstring)."""
    issuer: str | None = None
    """RFC 4514 issuer, escaped and bounded."""
    serial: str | None = None
    """Lowercase hex, no leading zeros."""
    fingerprint: str
    """SHA-256 of the DER, lowercase hex."""
    not_before: datetime | None = None
    """Start of validity (UTC)."""
    not_after: datetime | None = None
    """End of validity (UTC): in the past for a ``certificate_expired`` refusal."""
    unparsed: str | None = None
    """Why the bytes could not be read as a certificate (the other fields are then null)."""


def _escaped(char: str) -> str:
    if unicodedata.category(char) not in _HIDDEN:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int) -> str:
    """``text`` with control/format/surrogate characters escaped, cut to ``limit``."""
    head = text[: limit + 1]  # escaping only ever lengthens: no more can be kept
    # isprintable() is false for every character _escaped changes (and for separators).
    escaped = head if head.isprintable() else "".join(map(_escaped, head))
    return escaped if len(escaped) <= limit else escaped[: limit - len(_CUT)] + _CUT


def _name(name: x509.Name) -> str:
    try:
        text = name.rfc4514_string()
    except ValueError as exc:  # an attribute value cryptography cannot render
        text = f"<unreadable name: {exc}>"
    return printable(text, MAX_NAME)


def describe_certificate(der: bytes) -> PresentedCertificate:
    """The bounded description of a presented certificate (never raises on bad bytes).

    Cached per DER (immutable result): a device retrying with its expired certificate is
    described once, not at each refusal (cryptography's name parsing costs ~0.2 ms).
    """
    return _describe(der)


@lru_cache(maxsize=_CACHED)
def _describe(der: bytes) -> PresentedCertificate:
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        with warnings.catch_warnings():  # a peer's zero or negative serial is data, not news
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return _parsed(der, fingerprint)
    except Exception as exc:  # device bytes: whatever the parser objects to is recorded
        return PresentedCertificate(fingerprint=fingerprint, unparsed=printable(str(exc), MAX_NAME))


def _parsed(der: bytes, fingerprint: str) -> PresentedCertificate:
    cert = x509.load_der_x509_certificate(der)
    return PresentedCertificate(
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        serial=printable(format(cert.serial_number, "x"), MAX_SERIAL),
        fingerprint=fingerprint,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def presented_detail(certificate: PresentedCertificate) -> dict[str, Any]:
    """``detail.presented`` as stored: JSON values, nulls left out."""
    return certificate.model_dump(mode="json", exclude_none=True)
