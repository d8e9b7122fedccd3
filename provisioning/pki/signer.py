"""The issuance key behind a `Signer` interface, so that an HSM or KMS can replace the file.

`FileSigner` holds the key in memory (``issuing-ca.key``); `provisioning.pki.pkcs11`'s
`Pkcs11Signer` asks a PKCS#11 token. A key that only signs bytes (a token's) signs
builders with `sign_certificate_raw` and `sign_crl_raw`. A signer that cannot sign raises
`SignerUnavailable`: callers refuse the request and issue nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from provisioning.pki.leaf_der import signature_algorithm_of, signed_der
from schemas.errors import DevicegateError
from schemas.events import Reason


class SignerUnavailable(DevicegateError):
    """The CA key cannot sign now: its token is absent, locked (wrong PIN) or failing."""

    reason = Reason.SIGNER_UNAVAILABLE


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
CAKey = CAPrivateKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def signature_hash(key: CAKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest that goes with a CA key (private or public): SHA-384 for P-384, none for
    Ed25519, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return None
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


_stand_in: ec.EllipticCurvePrivateKey | None = None


def _stand_in_key() -> ec.EllipticCurvePrivateKey:
    """A throwaway key of this process: ``cryptography`` encodes a builder's TBS only while
    signing it, so a raw key's builders are signed with this first and signed again."""
    global _stand_in
    if _stand_in is None:
        _stand_in = ec.generate_private_key(ec.SECP256R1())
    return _stand_in


def sign_certificate_raw(
    builder: x509.CertificateBuilder,
    algorithm: hashes.SHA256 | hashes.SHA384,
    sign_bytes: Callable[[bytes], bytes],
) -> x509.Certificate:
    """``builder`` signed by an ECDSA key that only signs bytes (``sign_bytes`` returns a DER
    ECDSA-Sig-Value over its input hashed with ``algorithm``)."""
    draft = builder.sign(_stand_in_key(), algorithm).public_bytes(serialization.Encoding.DER)
    tbs = x509.load_der_x509_certificate(draft).tbs_certificate_bytes
    return x509.load_der_x509_certificate(
        signed_der(tbs, signature_algorithm_of(draft), sign_bytes(tbs))
    )


def sign_crl_raw(
    builder: x509.CertificateRevocationListBuilder,
    algorithm: hashes.SHA256 | hashes.SHA384,
    sign_bytes: Callable[[bytes], bytes],
) -> x509.CertificateRevocationList:
    """`sign_certificate_raw` for a CRL (the same three-part shape)."""
    draft = builder.sign(_stand_in_key(), algorithm).public_bytes(serialization.Encoding.DER)
    tbs = x509.load_der_x509_crl(draft).tbs_certlist_bytes
    return x509.load_der_x509_crl(signed_der(tbs, signature_algorithm_of(draft), sign_bytes(tbs)))


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
