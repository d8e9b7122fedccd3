"""The PKI on disk and the issuance mechanism.

``ca init`` writes, in the PKI directory (0700):

- ``root-ca.crt``, ``root-ca.key``        the root; its key can go offline after init
- ``issuing-ca.crt``, ``issuing-ca.key``  signs device and server certificates
- ``chain.pem``                           issuing + root: what devices and the gateway trust
- ``server.crt``, ``server.key``          the listeners' identity; not under the passphrase,
                                          so the gateway never holds a CA secret
- ``audit.crt``, ``audit.key``            the audit signer (Ed25519): signs the audit log's
                                          checkpoints; shipped like server.key, never in
                                          the database (``ca audit-key`` issues a new one)

Key files are 0600; CA keys are PKCS#8 encrypted (PBES2, AES-256-CBC). Issuance takes
`SignOptions` (what policy decided) and applies them; it decides nothing itself.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.pki.leaf_der import LeafTemplate, key_class, signature_algorithm_of, spki_der
from provisioning.pki.signer import CAPrivateKey, FileSigner, RawSigner, Signer, signature_hash
from schemas.checkpoints import AUDIT_CERT, AUDIT_KEY, AUDIT_SIGNER_NAME
from schemas.errors import DevicegateError
from schemas.events import Reason

log = logging.getLogger(__name__)

ROOT_CERT = "root-ca.crt"
ROOT_KEY = "root-ca.key"
ISSUING_CERT = "issuing-ca.crt"
ISSUING_KEY = "issuing-ca.key"
CHAIN = "chain.pem"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
PKI_FILES = (
    ROOT_CERT, ROOT_KEY, ISSUING_CERT, ISSUING_KEY, CHAIN, SERVER_CERT, SERVER_KEY, AUDIT_CERT,
    AUDIT_KEY,
)  # fmt: skip


class CAError(DevicegateError):
    """The PKI directory is missing, unreadable, or its keys cannot be opened."""


class KeyNotAllowed(DevicegateError):
    """A public key of a type or size that devicegate does not certify."""

    reason = Reason.KEY_NOT_ALLOWED


class CAKeyType(StrEnum):
    P256 = "p256"
    P384 = "p384"


DevicePublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def key_type_name(public_key: object) -> str:
    """``ec-p256``, ``ec-p384``, ``ed25519`` or ``rsa-<bits>`` for an allowed device key.

    Raises:
        KeyNotAllowed: any other key (DSA, RSA < 2048, P-192, secp256k1, ...).
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return "ec-p256"
        if isinstance(public_key.curve, ec.SECP384R1):
            return "ec-p384"
        raise KeyNotAllowed(f"EC curve {public_key.curve.name} is not allowed (use P-256 or P-384)")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise KeyNotAllowed(f"RSA-{public_key.key_size} is too short (at least 2048 bits)")
        return f"rsa-{public_key.key_size}"
    raise KeyNotAllowed(f"{type(public_key).__name__} keys are not allowed")


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a device certificate speaks for."""

    device_id: str
    fleet: str
    trust_domain: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/fleet/{self.fleet}/device/{self.device_id}"


@dataclass(frozen=True, slots=True)
class SignOptions:
    """What issuance policy decided; the CA applies it verbatim."""

    not_before: datetime
    not_after: datetime

    @classmethod
    def starting_now(
        cls, *, validity: timedelta, backdate: timedelta, now: datetime | None = None
    ) -> SignOptions:
        start = now or datetime.now(UTC)
        return cls(not_before=start - backdate, not_after=start + validity)


def serial_hex(serial: int) -> str:
    """The canonical text form of a serial number, as stored and shown: lowercase hex."""
    return format(serial, "x")


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER, lowercase hex."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def to_pem(*certificates: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)


def der_to_pem(der: bytes) -> str:
    """A DER certificate as `to_pem` writes it (64-character lines), without re-encoding it."""
    text = base64.b64encode(der).decode()
    lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


class CertificateAuthority:
    """Issues device certificates and CRLs with a `Signer` for the issuing CA."""

    def __init__(self, signer: Signer, root: x509.Certificate) -> None:
        self.signer = signer
        self.root = root
        self._issuer_key_id: tuple[x509.Certificate, x509.AuthorityKeyIdentifier] | None = None
        self._template: tuple[x509.Certificate, LeafTemplate] | None = None

    @property
    def issuing(self) -> x509.Certificate:
        return self.signer.certificate

    @property
    def chain_pem(self) -> str:
        return to_pem(self.issuing, self.root)

    def issue_device_certificate(
        self, public_key: DevicePublicKey, identity: DeviceIdentity, options: SignOptions
    ) -> x509.Certificate:
        """A client certificate for ``identity`` over ``public_key``.

        Encoded from the CA's template (`provisioning.pki.leaf_der`) once the template has been
        shown to produce the builder's exact TBSCertificate for this class of key; the
        first certificate of each class is built by the builder and used as that proof.

        Raises:
            KeyNotAllowed: the key is of a type devicegate does not certify.
        """
        key_type_name(public_key)
        serial = x509.random_serial_number()
        kind = key_class(public_key)
        template = self._template
        if template is not None and template[0] is self.issuing and template[1].verified.get(kind):
            tbs = template[1].tbs(
                serial=serial,
                not_before=options.not_before,
                not_after=options.not_after,
                device_id=identity.device_id,
                fleet=identity.fleet,
                spiffe_id=identity.spiffe_id,
                spki=spki_der(public_key),
                kind=kind,
            )
            if tbs is not None:
                return x509.load_der_x509_certificate(template[1].certificate(tbs))
        certificate = self.signer.sign_certificate(
            self._builder(public_key, identity, options, serial)
        )
        self._learn_template(certificate, public_key, identity, kind)
        return certificate

    def _builder(
        self,
        public_key: DevicePublicKey,
        identity: DeviceIdentity,
        options: SignOptions,
        serial: int,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.device_id),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.fleet),
                    ]
                )
            )
            .issuer_name(self.issuing.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(options.not_before)
            .not_valid_after(options.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_id)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_id(), critical=False)
        )

    def _authority_key_id(self) -> x509.AuthorityKeyIdentifier:
        issuing = self.issuing
        if self._issuer_key_id is None or self._issuer_key_id[0] is not issuing:
            issuer_key = issuing.public_key()
            assert isinstance(issuer_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key)
            self._issuer_key_id = (issuing, aki)  # the same for every certificate it signs
        return self._issuer_key_id[1]

    def _learn_template(
        self,
        built: x509.Certificate,
        public_key: DevicePublicKey,
        identity: DeviceIdentity,
        kind: str,
    ) -> None:
        """Compare the template's encoding of ``built``'s inputs with ``built`` itself; use
        the template for this key class only if they are identical."""
        signer = self.signer
        if not isinstance(signer, RawSigner):
            return
        issuing = self.issuing
        if self._template is None or self._template[0] is not issuing:
            template = LeafTemplate(
                signature_algorithm=signature_algorithm_of(
                    built.public_bytes(serialization.Encoding.DER)
                ),
                issuer=issuing.subject.public_bytes(),
                basic_constraints=x509.BasicConstraints(ca=False, path_length=None).public_bytes(),
                key_usage={k: v.public_bytes() for k, v in _KEY_USAGE_BY_CLASS.items()},
                extended_key_usage=x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH]
                ).public_bytes(),
                authority_key_id=self._authority_key_id().public_bytes(),
                sign=signer.sign_bytes,
            )
            self._template = (issuing, template)
        template = self._template[1]
        if kind in template.verified:
            return
        tbs = template.tbs(
            serial=built.serial_number,
            not_before=built.not_valid_before_utc,
            not_after=built.not_valid_after_utc,
            device_id=identity.device_id,
            fleet=identity.fleet,
            spiffe_id=identity.spiffe_id,
            spki=spki_der(public_key),
            kind=kind,
        )
        if tbs is None:
            return  # an input outside the template: decide on the next certificate
        same = tbs == built.tbs_certificate_bytes
        if not same:
            log.warning(
                "device certificate template differs from the builder's encoding "
                "for %s keys; issuing with the builder",
                kind,
            )
        template.verified[kind] = same

    def build_crl(
        self,
        revoked: Iterable[tuple[int, datetime]],
        *,
        next_update: timedelta = timedelta(hours=1),
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial, revoked_at)`` pairs, signed by the issuing CA."""
        issued = now or datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.issuing.subject)
            .last_update(issued)
            .next_update(issued + next_update)
        )
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
        return self.signer.sign_crl(builder)


def _key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# RSA key transport needs keyEncipherment on TLS 1.2; EC and Ed25519 only sign.
_KEY_USAGE_BY_CLASS = {
    "rsa": _key_usage(key_encipherment=True),
    "signing": _key_usage(key_encipherment=False),
}
"""A device certificate's key usage per `provisioning.pki.leaf_der.key_class`."""


def _leaf_key_usage(public_key: DevicePublicKey) -> x509.KeyUsage:
    return _KEY_USAGE_BY_CLASS[key_class(public_key)]


# --- the PKI directory -------------------------------------------------------------------


def _new_ca_key(key_type: CAKeyType) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1() if key_type is CAKeyType.P384 else ec.SECP256R1())


def _ca_certificate(
    *,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    validity: timedelta,
    path_length: int | None,
    now: datetime,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devicegate"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))


def _server_certificate(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    validity: timedelta,
    now: datetime,
) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    issuer_key = ca.issuing.public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
        )
    )
    return ca.signer.sign_certificate(builder)


def issue_audit_signer(
    ca: CertificateAuthority, directory: Path, *, validity: timedelta = timedelta(days=397)
) -> x509.Certificate:
    """A new audit signing key (Ed25519, ``audit.key`` 0600) and its certificate
    (``audit.crt``: CN `AUDIT_SIGNER_NAME`, keyUsage digitalSignature only, no CA), issued
    by the issuing CA. The previous certificate stays valid for the checkpoints it signed."""
    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    issuer_key = ca.issuing.public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devicegate"),
                    x509.NameAttribute(NameOID.COMMON_NAME, AUDIT_SIGNER_NAME),
                ]
            )
        )
        .issuer_name(ca.issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + validity, ca.issuing.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_encipherment=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
        )
    )
    certificate = ca.signer.sign_certificate(builder)
    _write(directory / AUDIT_KEY, _encrypted_pem(key, None), secret=True)
    _write(directory / AUDIT_CERT, to_pem(certificate).encode(), secret=False)
    return certificate


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write atomically; secrets are created 0600 from the start, never chmod-ed after."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _encrypted_pem(key: CAPrivateKey, passphrase: bytes | None) -> bytes:
    if passphrase is None:
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    else:
        # PKCS#8 with the best available scheme: PBES2, PBKDF2-HMAC-SHA256, AES-256-CBC.
        encryption = serialization.BestAvailableEncryption(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@dataclass(frozen=True, slots=True)
class PkiSummary:
    directory: Path
    root: x509.Certificate
    issuing: x509.Certificate
    server: x509.Certificate
    audit: x509.Certificate


def init_pki(
    directory: Path,
    *,
    passphrase: bytes | None,
    key_type: CAKeyType = CAKeyType.P256,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    force: bool = False,
    root_validity: timedelta = timedelta(days=3650),
    issuing_validity: timedelta = timedelta(days=1825),
    server_validity: timedelta = timedelta(days=397),
) -> PkiSummary:
    """Create the root CA, the issuing CA and the listeners' server certificate.

    Args:
        passphrase: encrypts the CA keys; ``None`` writes them unencrypted (callers must
            have the operator's explicit consent for that).

    Raises:
        CAError: a CA already exists there and ``force`` is false.
    """
    if not server_names:
        raise CAError("at least one server name is needed")
    existing = [name for name in PKI_FILES if (directory / name).exists()]
    if existing and not force:
        raise CAError(
            f"a CA already exists in {directory} ({', '.join(existing)}); "
            "use --force to replace it (every issued certificate stops verifying)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.now(UTC)

    root_key = _new_ca_key(key_type)
    root = _ca_certificate(
        subject="devicegate Root CA",
        key=root_key,
        issuer=None,
        issuer_key=root_key,
        validity=root_validity,
        path_length=1,
        now=now,
    )
    issuing_key = _new_ca_key(key_type)
    issuing = _ca_certificate(
        subject="devicegate Issuing CA",
        key=issuing_key,
        issuer=root,
        issuer_key=root_key,
        validity=min(issuing_validity, root_validity),
        path_length=0,
        now=now,
    )
    ca = CertificateAuthority(FileSigner(issuing_key, issuing), root)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _server_certificate(ca, server_key, server_names, server_validity, now)

    _write(directory / ROOT_KEY, _encrypted_pem(root_key, passphrase), secret=True)
    _write(directory / ISSUING_KEY, _encrypted_pem(issuing_key, passphrase), secret=True)
    _write(directory / SERVER_KEY, _encrypted_pem(server_key, None), secret=True)
    _write(directory / ROOT_CERT, to_pem(root).encode(), secret=False)
    _write(directory / ISSUING_CERT, to_pem(issuing).encode(), secret=False)
    _write(directory / CHAIN, to_pem(issuing, root).encode(), secret=False)
    _write(directory / SERVER_CERT, to_pem(server, issuing).encode(), secret=False)
    audit = issue_audit_signer(ca, directory, validity=server_validity)
    return PkiSummary(directory, root, issuing, server, audit)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path} does not exist; run `devicegate ca init` first") from None
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror}") from None


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise CAError(f"{path} is not a PEM certificate") from None


def load_private_key(path: Path, passphrase: bytes | None) -> CAPrivateKey:
    """Open an (encrypted) PKCS#8 key, with one clear error line naming the file."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:
        if passphrase is None:
            raise CAError(
                f"{path} is encrypted: "
                "set DEVICEGATE_CA_PASSPHRASE or DEVICEGATE_CA_PASSPHRASE_FILE"
            ) from None
        raise CAError(f"{path} is not encrypted, but a passphrase was given") from None
    except ValueError:
        raise CAError(f"wrong CA passphrase for {path} (or the file is damaged)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CAError(f"{path} holds a {type(key).__name__}, not an EC or Ed25519 CA key")
    return key


def load_ca(directory: Path, passphrase: bytes | None) -> CertificateAuthority:
    """The issuing CA from the PKI directory (the root key is not needed, nor opened)."""
    issuing = load_certificate(directory / ISSUING_CERT)
    root = load_certificate(directory / ROOT_CERT)
    key = load_private_key(directory / ISSUING_KEY, passphrase)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != issuing.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAError(f"{directory / ISSUING_KEY} does not belong to {directory / ISSUING_CERT}")
    return CertificateAuthority(FileSigner(key, issuing), root)


def describe_pki(directory: Path) -> list[tuple[str, x509.Certificate]]:
    """The certificates of the PKI directory, for ``ca show``."""
    return [
        (name, load_certificate(directory / name))
        for name in (ROOT_CERT, ISSUING_CERT, SERVER_CERT, AUDIT_CERT)
        if name != AUDIT_CERT or (directory / name).exists()
    ]
