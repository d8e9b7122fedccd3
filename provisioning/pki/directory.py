"""The PKI on disk: ``ca init`` and opening the issuing CA.

``ca init`` writes, in the PKI directory (0700):

- ``root-ca.crt``, ``root-ca.key``        the root; its key can go offline after init
- ``issuing-ca.crt``, ``issuing-ca.key``  signs device and server certificates
- ``chain.pem``                           issuing + root: what devices and the gateway trust
- ``server.crt``, ``server.key``          the listeners' identity; not under the passphrase,
                                          so the gateway never holds a CA secret
- ``audit.crt``, ``audit.key``            the audit signer (Ed25519): signs the audit log's
                                          checkpoints; shipped like server.key, never in
                                          the database (``ca audit-key`` issues a new one)
- ``ticket-keys``                         the gateway's TLS session ticket keys (a secret,
                                          shipped like server.key; ``ticket-keys rotate``)

Key files are 0600; CA keys are PKCS#8 encrypted (PBES2, AES-256-CBC).

With a PKCS#11 token (``ca init --pkcs11-module``) the root and issuing keys are generated
in the token and there is no ``root-ca.key`` nor ``issuing-ca.key``: ``ca-keys.toml``
(`provisioning.pki.pkcs11.CaKeysRecord`) says which module, token and key labels to use,
and `load_ca` signs through the token when it exists (docs/hsm.md).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.pki.ca import (
    SIGNING_KEY_USAGE,
    CertificateAuthority,
    crl_distribution_points,
    to_pem,
)
from provisioning.pki.signer import CAPrivateKey, FileSigner, Signer, signature_hash
from schemas.checkpoints import AUDIT_CERT, AUDIT_KEY, AUDIT_SIGNER_NAME
from schemas.errors import DevicegateError
from schemas.ticket_keys import TICKET_KEYS_FILE, rotate_ticket_keys

if TYPE_CHECKING:  # provisioning.pki.pkcs11 (python-pkcs11) is imported when a token is used
    from provisioning.pki.pkcs11 import CaKeysRecord, KeyRef, TokenRef

ROOT_CERT = "root-ca.crt"
ROOT_KEY = "root-ca.key"
ISSUING_CERT = "issuing-ca.crt"
ISSUING_KEY = "issuing-ca.key"
CHAIN = "chain.pem"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CA_KEYS = "ca-keys.toml"
"""Where the CA keys are when they are in a PKCS#11 token (`provisioning.pki.pkcs11`)."""
PKI_FILES = (
    ROOT_CERT, ROOT_KEY, ISSUING_CERT, ISSUING_KEY, CHAIN, SERVER_CERT, SERVER_KEY, AUDIT_CERT,
    AUDIT_KEY, TICKET_KEYS_FILE, CA_KEYS,
)  # fmt: skip


class CAError(DevicegateError):
    """The PKI directory is missing, unreadable, or its keys cannot be opened."""


class CAKeyType(StrEnum):
    P256 = "p256"
    P384 = "p384"


def _curve(key_type: CAKeyType) -> ec.EllipticCurve:
    return ec.SECP384R1() if key_type is CAKeyType.P384 else ec.SECP256R1()


@dataclass(frozen=True, slots=True)
class _CAKey:
    """A new CA key, wherever it lives: its public half, how it signs a builder, and the
    `Signer` it becomes once its certificate exists."""

    public_key: ec.EllipticCurvePublicKey
    sign: Callable[[x509.CertificateBuilder], x509.Certificate]
    signer: Callable[[x509.Certificate], Signer]
    private_key: ec.EllipticCurvePrivateKey | None = None
    """In memory (to be written to its file), or None: in a token."""

    @classmethod
    def in_memory(cls, key: ec.EllipticCurvePrivateKey) -> _CAKey:
        return cls(
            key.public_key(),
            lambda builder: builder.sign(key, signature_hash(key)),
            lambda certificate: FileSigner(key, certificate),
            key,
        )

    @classmethod
    def in_token(cls, token: TokenRef, ref: KeyRef, curve: ec.EllipticCurve) -> _CAKey:
        from provisioning.pki.pkcs11 import Pkcs11Signer, generate_ca_key

        key = generate_ca_key(token, ref, curve)
        return cls(
            key.public_key,
            key.sign_certificate,
            lambda certificate: Pkcs11Signer(key, certificate),
        )


def _ca_certificate(
    *,
    subject: str,
    key: _CAKey,
    issuer: x509.Certificate | None,
    issuer_key: _CAKey,
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
        .public_key(key.public_key)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key),
            critical=False,
        )
    )
    return issuer_key.sign(builder)


def _server_certificate(
    ca: CertificateAuthority,
    key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    validity: timedelta,
    now: datetime,
    crl_url: str | None,
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
    if crl_url is not None:
        builder = builder.add_extension(crl_distribution_points(crl_url), critical=False)
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
        .add_extension(SIGNING_KEY_USAGE, critical=True)
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
    crl_url: str | None = None,
    token: TokenRef | None = None,
) -> PkiSummary:
    """Create the root CA, the issuing CA and the listeners' server certificate.

    Args:
        passphrase: encrypts the CA keys; ``None`` writes them unencrypted (callers must
            have the operator's explicit consent for that). Unused with ``token``.
        crl_url: the CRL distribution point of the server certificate (``devicegate ca
            init`` always gives one; None leaves it out, as for test and rogue CAs).
        token: generate the root and issuing keys in this PKCS#11 token (labels
            ``devicegate-root-<id>`` and ``devicegate-issuing-<id>``, a new random id per
            CA) and write ``ca-keys.toml`` instead of the two CA key files.

    Raises:
        CAError: a CA already exists there and ``force`` is false.
        SignerUnavailable: the token cannot be used (module, token, PIN).
    """
    if not server_names:
        raise CAError("at least one server name is needed")
    existing = [name for name in PKI_FILES if (directory / name).exists()]
    if existing and not force:
        raise CAError(
            f"a CA already exists in {directory} ({', '.join(existing)}); "
            "use --force to replace it (every issued certificate stops verifying)"
        )
    now = datetime.now(UTC)

    record: CaKeysRecord | None = None
    if token is None:
        root_key = _CAKey.in_memory(ec.generate_private_key(_curve(key_type)))
        issuing_key = _CAKey.in_memory(ec.generate_private_key(_curve(key_type)))
    else:
        from provisioning.pki.pkcs11 import CaKeysRecord, KeyRef

        ca_id = secrets.token_bytes(8)
        record = CaKeysRecord(
            token,
            root=KeyRef(f"devicegate-root-{ca_id.hex()}", ca_id + b"root"),
            issuing=KeyRef(f"devicegate-issuing-{ca_id.hex()}", ca_id + b"issuing"),
        )
        root_key = _CAKey.in_token(token, record.root, _curve(key_type))
        issuing_key = _CAKey.in_token(token, record.issuing, _curve(key_type))
    directory.mkdir(parents=True, exist_ok=True)  # once the token made the keys
    directory.chmod(0o700)
    root = _ca_certificate(
        subject="devicegate Root CA",
        key=root_key,
        issuer=None,
        issuer_key=root_key,
        validity=root_validity,
        path_length=1,
        now=now,
    )
    issuing = _ca_certificate(
        subject="devicegate Issuing CA",
        key=issuing_key,
        issuer=root,
        issuer_key=root_key,
        validity=min(issuing_validity, root_validity),
        path_length=0,
        now=now,
    )
    ca = CertificateAuthority(issuing_key.signer(issuing), root)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _server_certificate(ca, server_key, server_names, server_validity, now, crl_url)

    if record is None:
        assert root_key.private_key is not None and issuing_key.private_key is not None
        _write(directory / ROOT_KEY, _encrypted_pem(root_key.private_key, passphrase), secret=True)
        _write(
            directory / ISSUING_KEY,
            _encrypted_pem(issuing_key.private_key, passphrase),
            secret=True,
        )
        (directory / CA_KEYS).unlink(missing_ok=True)  # a token CA replaced (--force)
    else:
        _write(directory / CA_KEYS, record.render(), secret=False)
        for stale in (ROOT_KEY, ISSUING_KEY):  # a file CA replaced (--force)
            (directory / stale).unlink(missing_ok=True)
    _write(directory / SERVER_KEY, _encrypted_pem(server_key, None), secret=True)
    _write(directory / ROOT_CERT, to_pem(root).encode(), secret=False)
    _write(directory / ISSUING_CERT, to_pem(issuing).encode(), secret=False)
    _write(directory / CHAIN, to_pem(issuing, root).encode(), secret=False)
    _write(directory / SERVER_CERT, to_pem(server, issuing).encode(), secret=False)
    audit = issue_audit_signer(ca, directory, validity=server_validity)
    # A new PKI gets new ticket keys: a ticket from the old one must not resume.
    (directory / TICKET_KEYS_FILE).unlink(missing_ok=True)
    rotate_ticket_keys(directory / TICKET_KEYS_FILE, keep=0)
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


def load_ca(
    directory: Path,
    passphrase: bytes | None,
    *,
    crl_url: str | None = None,
    pin_file: Path | None = None,
) -> CertificateAuthority:
    """The issuing CA from the PKI directory (the root key is not needed, nor opened).

    Its `Signer` is a `Pkcs11Signer` when ``ca-keys.toml`` exists (the token is opened on
    first use, so a token that is away now makes refusals, not a failed start), else a
    `FileSigner` over ``issuing-ca.key``.

    Args:
        crl_url: the CRL distribution point of the device certificates it issues.
        pin_file: the token's PIN file, instead of the one ``ca-keys.toml`` names.
    """
    issuing = load_certificate(directory / ISSUING_CERT)
    root = load_certificate(directory / ROOT_CERT)
    if (directory / CA_KEYS).exists():
        from provisioning.pki.pkcs11 import CaKeysRecord, Pkcs11Signer

        record = CaKeysRecord.read(directory / CA_KEYS, pin_file=pin_file)
        return CertificateAuthority(Pkcs11Signer.open(record, issuing), root, crl_url=crl_url)
    key = load_private_key(directory / ISSUING_KEY, passphrase)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != issuing.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAError(f"{directory / ISSUING_KEY} does not belong to {directory / ISSUING_CERT}")
    return CertificateAuthority(FileSigner(key, issuing), root, crl_url=crl_url)


def describe_pki(directory: Path) -> list[tuple[str, x509.Certificate]]:
    """The certificates of the PKI directory, for ``ca show``."""
    return [
        (name, load_certificate(directory / name))
        for name in (ROOT_CERT, ISSUING_CERT, SERVER_CERT, AUDIT_CERT)
        if name != AUDIT_CERT or (directory / name).exists()
    ]
