"""A device manufacturer for the demo and the tests: a root CA, an optional intermediate, and
IDevIDs (IEEE 802.1AR device certificates and their keys, as files) made with cryptography,
as a factory would put them in each device's secure element. The key files are 0600."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Manufacturing"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca(
    subject: str, key: Key, issuer: x509.Certificate | None, issuer_key: Key
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def spki_hex(certificate: x509.Certificate) -> str:
    der = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass
class Idevid:
    cert: Path
    key: Path
    certificate: x509.Certificate

    @property
    def serial(self) -> str:
        return format(self.certificate.serial_number, "x")

    @property
    def spki(self) -> str:
        return spki_hex(self.certificate)


@dataclass
class Manufacturer:
    directory: Path
    name: str = "mfr"
    intermediate_ca: bool = True
    root_key: Key = field(init=False)
    root: x509.Certificate = field(init=False)
    signer_key: Key = field(init=False)
    signer: x509.Certificate = field(init=False)
    root_path: Path = field(init=False)
    intermediate_path: Path | None = field(init=False, default=None)
    _count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _ca(f"{self.name} root", self.root_key, None, self.root_key)
        self.root_path = self.directory / f"{self.name}-root.pem"
        self.root_path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        self.signer_key, self.signer = self.root_key, self.root
        if self.intermediate_ca:
            self.signer_key = ec.generate_private_key(ec.SECP256R1())
            self.signer = _ca(f"{self.name} devices", self.signer_key, self.root, self.root_key)
            self.intermediate_path = self.directory / f"{self.name}-intermediate.pem"
            self.intermediate_path.write_bytes(self.signer.public_bytes(serialization.Encoding.PEM))

    def idevid(
        self,
        *,
        not_after: datetime | None = None,
        digital_signature: bool = True,
        key: Key | None = None,
    ) -> Idevid:
        """A new IDevID (a new key unless ``key`` is given) signed by the device CA."""
        self._count += 1
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.SERIAL_NUMBER, f"SN{self._count:06d}"),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} device"),
                    ]
                )
            )
            .issuer_name(self.signer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=2))
            .not_valid_after(not_after or now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=digital_signature,
                    content_commitment=False,
                    key_encipherment=not digital_signature,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.signer_key, hashes.SHA256())
        )
        stem = self.directory / f"{self.name}-idevid-{self._count}"
        cert = stem.with_suffix(".crt")
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path = stem.with_suffix(".key")
        key_path.unlink(missing_ok=True)
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return Idevid(cert, key_path, certificate)

    def crl(self, *revoked: Idevid) -> Path:
        """A CRL of the device CA revoking ``revoked``."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.signer.subject)
            .last_update(now - timedelta(minutes=1))
            .next_update(now + timedelta(days=7))
        )
        for idevid in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(idevid.certificate.serial_number)
                .revocation_date(now - timedelta(minutes=1))
                .build()
            )
        path = self.directory / f"{self.name}-crl.pem"
        path.write_bytes(
            builder.sign(self.signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        return path
