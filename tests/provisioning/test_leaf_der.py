"""Device certificates from the DER template are the builder's certificates, byte for byte."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.agent.device import KeyType, generate_key
from provisioning.pki.ca import (
    CertificateAuthority,
    DeviceIdentity,
    SignOptions,
    crl_url_of,
    der_to_pem,
    fingerprint,
    to_pem,
)
from provisioning.pki.directory import CAKeyType, init_pki, load_ca
from provisioning.pki.leaf_der import key_class, spki_der, subject_key_id

CRL_URL = "https://prov.example.test:8443/v1/crl"


# Each CA key type, with and without a CRL distribution point (a PKI made before there was
# one, or a rogue CA in the tests).
@pytest.fixture(
    scope="module",
    params=[(key_type, url) for key_type in CAKeyType for url in (CRL_URL, None)],
    ids=lambda param: f"{param[0]}-{'crl' if param[1] else 'no-crl'}",
)
def ca(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> CertificateAuthority:
    key_type, crl_url = request.param
    directory: Path = tmp_path_factory.mktemp(f"pki-{key_type}") / "pki"
    init_pki(directory, passphrase=b"pw", key_type=key_type)
    return load_ca(directory, b"pw", crl_url=crl_url)


IDENTITY = DeviceIdentity("line7-abcdefghijkl", "line7", "devicegate.test")


@pytest.mark.parametrize("key_type", list(KeyType))
def test_template_matches_the_builder(ca: CertificateAuthority, key_type: KeyType) -> None:
    key = generate_key(key_type).public_key()
    options = SignOptions.starting_now(validity=timedelta(days=30), backdate=timedelta(minutes=5))
    first = ca.issue_device_certificate(key, IDENTITY, options)  # the builder's, and the proof
    assert ca._template is not None
    assert ca._template[1].verified[key_class(key)] is True
    issued = ca.issue_device_certificate(key, IDENTITY, options)  # from the template
    assert issued.serial_number != first.serial_number
    issued.verify_directly_issued_by(ca.issuing)
    built = ca.signer.sign_certificate(ca._builder(key, IDENTITY, options, issued.serial_number))
    assert issued.tbs_certificate_bytes == built.tbs_certificate_bytes
    assert issued.signature_algorithm_oid == built.signature_algorithm_oid
    # And what devices and the gateway read from it:
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == IDENTITY.device_id
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY.spiffe_id]
    eku = issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert crl_url_of(issued) == ca.crl_url


@pytest.mark.parametrize(
    "when",
    [
        datetime(2049, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # last UTCTime second
        datetime(2050, 1, 1, tzinfo=UTC),  # first GeneralizedTime
        datetime(2030, 6, 1, 12, 0, 0, 123_456, tzinfo=UTC),  # microseconds dropped
    ],
)
def test_validity_encodings_match(ca: CertificateAuthority, when: datetime) -> None:
    key = generate_key(KeyType.P256).public_key()
    ca.issue_device_certificate(
        key, IDENTITY, SignOptions.starting_now(validity=timedelta(days=1), backdate=timedelta(0))
    )  # learn the template
    options = SignOptions(not_before=when - timedelta(days=1), not_after=when)
    issued = ca.issue_device_certificate(key, IDENTITY, options)
    built = ca.signer.sign_certificate(ca._builder(key, IDENTITY, options, issued.serial_number))
    assert issued.tbs_certificate_bytes == built.tbs_certificate_bytes


def test_long_names_and_non_ascii_fall_back_or_match(ca: CertificateAuthority) -> None:
    key = generate_key(KeyType.P256).public_key()
    options = SignOptions.starting_now(validity=timedelta(days=30), backdate=timedelta(0))
    ca.issue_device_certificate(key, IDENTITY, options)
    long_identity = DeviceIdentity("d" * 60, "f" * 63, "t" * 120)  # multi-byte DER lengths
    issued = ca.issue_device_certificate(key, long_identity, options)
    built = ca.signer.sign_certificate(
        ca._builder(key, long_identity, options, issued.serial_number)
    )
    assert issued.tbs_certificate_bytes == built.tbs_certificate_bytes
    # A SAN the template does not cover goes to the builder, which decides as before.
    odd = DeviceIdentity("d1", "f1", "tr\u00fcst.example")
    assert ca._template is not None
    assert (
        ca._template[1].tbs(
            serial=1,
            not_before=options.not_before,
            not_after=options.not_after,
            device_id=odd.device_id,
            fleet=odd.fleet,
            spiffe_id=odd.spiffe_id,
            spki=spki_der(key),
            kind="signing",
        )
        is None
    )
    with pytest.raises(ValueError):  # cryptography refuses a non-ASCII URI
        ca.signer.sign_certificate(ca._builder(key, odd, options, 1))
    with pytest.raises(ValueError):
        ca.issue_device_certificate(key, odd, options)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_subject_key_id_is_cryptography_s(key_type: KeyType) -> None:
    key = generate_key(key_type).public_key()
    expected = x509.SubjectKeyIdentifier.from_public_key(key).digest
    assert subject_key_id(spki_der(key)) == expected
    assert spki_der(key) == key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_template_that_differs_is_not_used(ca: CertificateAuthority) -> None:
    key = generate_key(KeyType.P256).public_key()
    options = SignOptions.starting_now(validity=timedelta(days=30), backdate=timedelta(0))
    ca.issue_device_certificate(key, IDENTITY, options)
    assert ca._template is not None
    template = ca._template[1]
    template.verified.clear()
    template._last_extensions = b"\x30\x00"  # as if cryptography encoded it differently
    issued = ca.issue_device_certificate(key, IDENTITY, options)
    assert template.verified == {"signing": False}
    issued.verify_directly_issued_by(ca.issuing)
    again = ca.issue_device_certificate(key, IDENTITY, options)
    built = ca.signer.sign_certificate(ca._builder(key, IDENTITY, options, again.serial_number))
    assert again.tbs_certificate_bytes == built.tbs_certificate_bytes
    ca._template = None  # the next test learns afresh


def test_der_to_pem_is_to_pem(ca: CertificateAuthority) -> None:
    key = generate_key(KeyType.RSA2048).public_key()
    options = SignOptions.starting_now(validity=timedelta(days=30), backdate=timedelta(0))
    for certificate in (ca.issue_device_certificate(key, IDENTITY, options), ca.issuing, ca.root):
        der = certificate.public_bytes(serialization.Encoding.DER)
        assert der_to_pem(der) == to_pem(certificate)
        assert hashlib.sha256(der).hexdigest() == fingerprint(certificate)
