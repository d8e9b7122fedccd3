"""The issuance key behind a `Signer` interface, so that an HSM or KMS can replace the file."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519


class Signer(Protocol):
    """Signs certificates and CRLs as one CA. Implementations never expose the private key."""

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate whose key signs."""
        ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully built certificate (issuer name already set)."""
        ...

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign a fully built CRL."""
        ...


@runtime_checkable
class RawSigner(Protocol):
    """A `Signer` that can also sign arbitrary bytes (a DER TBSCertificate) with its key, so
    that device certificates can be encoded from a template (`provisioning.pki.leaf_der`)
    instead of a builder. Optional: without it the builder path is used."""

    def sign_bytes(self, data: bytes) -> bytes:
        """The signature over ``data``, as it goes into a certificate's signatureValue."""
        ...


CAPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def signature_hash(key: CAPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest that goes with a CA key: SHA-384 for P-384, none for Ed25519, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


class FileSigner:
    """A `Signer` over a private key loaded from an encrypted PKCS#8 file."""

    def __init__(self, private_key: CAPrivateKey, certificate: x509.Certificate) -> None:
        self._key = private_key
        self._certificate = certificate
        self._hash = signature_hash(private_key)
        self._ecdsa = ec.ECDSA(self._hash) if self._hash is not None else None

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, self._hash)

    def sign_bytes(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        assert self._ecdsa is not None  # EC keys always have a hash (`signature_hash`)
        return self._key.sign(data, self._ecdsa)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self._key, self._hash)
