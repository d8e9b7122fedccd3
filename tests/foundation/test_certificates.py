"""`schemas.certificates`: a presented certificate described, bounded and escaped, whatever
the bytes (they come from the peer)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.certificates import MAX_NAME, describe_certificate, presented_detail, printable
from schemas.events import holds_nul
from tests.conftest import Pki

HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def test_describes_a_certificate_of_ours(pki: Pki) -> None:
    described = describe_certificate(_der(pki.server_cert))
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert described.subject == cert.subject.rfc4514_string()
    assert described.issuer == pki.ca.issuing.subject.rfc4514_string()
    assert described.serial == format(cert.serial_number, "x")
    assert described.not_after == cert.not_valid_after_utc
    assert described.unparsed is None
    detail = presented_detail(described)
    assert detail["not_after"].endswith("Z") and "unparsed" not in detail


@given(st.text(max_size=600), st.integers(min_value=8, max_value=300))
def test_printable_is_bounded_and_shows_no_hidden_character(text: str, limit: int) -> None:
    shown = printable(text, limit)
    assert len(shown) <= limit
    assert not any(unicodedata.category(c) in HIDDEN for c in shown)
    if len(text) <= limit and text.isprintable():
        assert shown == text


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_bytes_are_described_never_raised(pki: Pki, data: st.DataObject) -> None:
    """Random bytes and single-byte corruptions of a real certificate."""
    der = bytearray(_der(pki.server_cert))
    if data.draw(st.booleans()):
        der = bytearray(data.draw(st.binary(max_size=2000)))
    elif der:
        at = data.draw(st.integers(min_value=0, max_value=len(der) - 1))
        der[at] = data.draw(st.integers(min_value=0, max_value=255))
    described = describe_certificate(bytes(der))
    assert len(described.fingerprint) == 64
    assert (described.unparsed is None) == (described.subject is not None)
    for text in (described.subject, described.issuer, described.serial, described.unparsed):
        assert text is None or len(text) <= MAX_NAME
    assert not holds_nul(presented_detail(described))  # PostgreSQL's jsonb takes it
