"""Device identity from certificates: the project's CA, and hand-made wrong ones."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.identity import IdentityError, identity_from_der
from provisioning.pki.ca import DeviceIdentity, SignOptions
from schemas.events import Reason
from tests.conftest import Pki

DOMAIN = "devicegate.local"


def test_identity_of_a_device_certificate(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    options = SignOptions.starting_now(validity=timedelta(days=1), backdate=timedelta(minutes=5))
    cert = pki.ca.issue_device_certificate(
        key.public_key(), DeviceIdentity("dev-1", "plant", DOMAIN), options
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    identity = identity_from_der(der, trust_domain=DOMAIN)
    assert identity.device_id == "dev-1"
    assert identity.fleet == "plant"
    assert identity.serial == format(cert.serial_number, "x")
    assert identity.fingerprint == hashlib.sha256(der).hexdigest()


def _cert(cn: str | None, uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("cn", "uris"),
    [
        ("dev-1", ["spiffe://devicegate.local/fleet/plant/device/dev-2"]),  # CN mismatch
        ("dev-1", ["spiffe://evil.example/fleet/plant/device/dev-1"]),  # foreign domain
        ("dev-1", []),  # no SAN
        (None, ["spiffe://devicegate.local/fleet/plant/device/dev-1"]),  # no CN
        ("dev-1", ["spiffe://devicegate.local/fleet/plant/device/dev-1/x"]),  # malformed
        ("+", ["spiffe://devicegate.local/fleet/plant/device/+"]),  # wildcard id
        ("dev-1", ["spiffe://devicegate.local/fleet/#/device/dev-1"]),  # wildcard fleet
        (
            "dev-1",
            [
                "spiffe://devicegate.local/fleet/plant/device/dev-1",
                "spiffe://devicegate.local/fleet/other/device/dev-1",
            ],
        ),
    ],
)
def test_wrong_identities_are_certificate_invalid(cn: str | None, uris: list[str]) -> None:
    with pytest.raises(IdentityError) as info:
        identity_from_der(_cert(cn, uris), trust_domain=DOMAIN)
    assert info.value.reason is Reason.CERTIFICATE_INVALID


def test_garbage_is_certificate_invalid() -> None:
    with pytest.raises(IdentityError):
        identity_from_der(b"\x30\x03\x02\x01\x00", trust_domain=DOMAIN)


def test_identity_is_cached_per_certificate_and_trust_domain() -> None:
    der = _cert("dev-7", ["spiffe://devicegate.local/fleet/plant/device/dev-7"])
    first = identity_from_der(der, trust_domain=DOMAIN)
    # A fresh bytes object with the same content (as each handshake gives): same reading.
    assert identity_from_der(bytes(bytearray(der)), trust_domain=DOMAIN) is first
    # The cache is keyed by the trust domain too: a foreign domain is still refused.
    with pytest.raises(IdentityError):
        identity_from_der(der, trust_domain="elsewhere.example")
    # A different certificate of the same device is read on its own (its serial).
    other = _cert("dev-7", ["spiffe://devicegate.local/fleet/plant/device/dev-7"])
    assert identity_from_der(other, trust_domain=DOMAIN).serial != first.serial
