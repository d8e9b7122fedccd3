"""The issuance mechanism: device certificates and CRLs signed through a `Signer`.

Issuance takes `SignOptions` (what policy decided) and applies them; it decides nothing
itself. Device certificates are encoded from the issuing CA's DER template
(`provisioning.pki.leaf_der`). The files of the PKI are `provisioning.pki.directory`'s.

The server certificate and every device certificate name the CRL that provisioning serves
(``<public_url>/v1/crl``) as their CRL distribution point, so a relying party (and a TLS
scanner) can find the revocation list from the certificate alone.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.pki.leaf_der import LeafTemplate, key_class, signature_algorithm_of, spki_der
from provisioning.pki.signer import RawSigner, Signer
from schemas.errors import DevicegateError
from schemas.events import Reason

log = logging.getLogger(__name__)


class KeyNotAllowed(DevicegateError):
    """A public key of a type or size that devicegate does not certify."""

    reason = Reason.KEY_NOT_ALLOWED


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


def crl_distribution_points(url: str) -> x509.CRLDistributionPoints:
    """The extension naming ``url`` as the one place to fetch the issuing CA's CRL."""
    return x509.CRLDistributionPoints(
        [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
    )


def crl_url_of(certificate: x509.Certificate) -> str | None:
    """The first URI of a certificate's CRL distribution points, if it has one."""
    try:
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        return None
    for point in points.value:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    return None


def derived_public_url(server_name: str, listen: str) -> str:
    """``https://<server_name>:<port of listen>``: where provisioning is reached when
    nobody said otherwise (the server certificate's first name is one clients must use)."""
    host = f"[{server_name}]" if ":" in server_name else server_name
    return f"https://{host}:{listen.rpartition(':')[2]}"


class CertificateAuthority:
    """Issues device certificates and CRLs with a `Signer` for the issuing CA.

    Args:
        crl_url: the CRL distribution point written into device certificates (None: none).
    """

    def __init__(
        self, signer: Signer, root: x509.Certificate, *, crl_url: str | None = None
    ) -> None:
        self.signer = signer
        self.root = root
        self.crl_url = crl_url
        self._crl_dp = None if crl_url is None else crl_distribution_points(crl_url)
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
        builder = (
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
        if self._crl_dp is not None:
            builder = builder.add_extension(self._crl_dp, critical=False)
        return builder

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
            crl_dp = None if self._crl_dp is None else self._crl_dp.public_bytes()
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
                crl_distribution_points=crl_dp,
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
SIGNING_KEY_USAGE = _key_usage(key_encipherment=False)
"""digitalSignature only: device keys that only sign, and the audit signer."""

_KEY_USAGE_BY_CLASS = {
    "rsa": _key_usage(key_encipherment=True),
    "signing": SIGNING_KEY_USAGE,
}
"""A device certificate's key usage per `provisioning.pki.leaf_der.key_class`."""


def _leaf_key_usage(public_key: DevicePublicKey) -> x509.KeyUsage:
    return _KEY_USAGE_BY_CLASS[key_class(public_key)]
