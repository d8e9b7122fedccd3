"""Issuance policy: what a bootstrap token or a current certificate authorizes.

Provisioners decide and return data (`Issuance`); `CertificateAuthority` applies it. They
read nothing and write nothing: the service hands them the rows it loaded, so policy is
testable without a database and the transaction stays short.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from provisioning.errors import CertificateRejected, DeviceRejected, HardwareIdTaken
from provisioning.pki.ca import DeviceIdentity, SignOptions
from provisioning.store import UsableToken
from provisioning.tokens import new_device_id
from schemas.api import CertificateInfo, DeviceInfo
from schemas.events import Reason
from schemas.settings import Settings

CLOCK_SKEW = timedelta(minutes=5)
"""Tolerance for a presented certificate whose notBefore is slightly in the future."""


@dataclass(frozen=True, slots=True)
class Issuance:
    """A decision to issue: for whom, with which options, and whether it replaces a device's
    earlier enrollment (re-enrollment of the same hardware)."""

    identity: DeviceIdentity
    options: SignOptions
    reenroll: bool = False


def _options(settings: Settings, now: datetime | None) -> SignOptions:
    return SignOptions.starting_now(
        validity=settings.cert_validity, backdate=settings.cert_backdate, now=now
    )


@dataclass(frozen=True, slots=True)
class TokenProvisioner:
    """Enrollment with a bootstrap token: a new identity in the token's fleet."""

    settings: Settings

    def authorize(
        self,
        *,
        token: UsableToken,
        existing: DeviceInfo | None,
        now: datetime | None = None,
    ) -> Issuance:
        """Decide an enrollment.

        Args:
            token: the (usable) bootstrap token presented.
            existing: the device already enrolled with the same hardware id, if any.

        Raises:
            HardwareIdTaken: the hardware is enrolled and the token may not re-enroll it.
            DeviceRejected: the hardware's device was revoked (re-enrollment cannot undo that).
        """
        options = _options(self.settings, now)
        if existing is None:
            identity = DeviceIdentity(
                new_device_id(token.fleet), token.fleet, self.settings.trust_domain
            )
            return Issuance(identity, options)
        if not token.allow_reenroll:
            raise HardwareIdTaken(f"hardware id is already enrolled as {existing.device_id}")
        if existing.fleet != token.fleet:
            raise HardwareIdTaken("hardware id is enrolled in another fleet")
        if existing.status == "revoked":
            raise DeviceRejected(
                f"device {existing.device_id} is revoked", reason=Reason.DEVICE_REVOKED
            )
        identity = DeviceIdentity(existing.device_id, existing.fleet, self.settings.trust_domain)
        return Issuance(identity, options, reenroll=True)


@dataclass(frozen=True, slots=True)
class RenewalProvisioner:
    """Renewal with the current certificate: the same identity, a fresh validity period."""

    settings: Settings

    def authorize(
        self,
        *,
        certificate: CertificateInfo,
        device: DeviceInfo,
        now: datetime | None = None,
    ) -> Issuance:
        """Decide a renewal.

        Raises:
            CertificateRejected: revoked, superseded, not yet valid, or expired beyond grace.
            DeviceRejected: the device is disabled or revoked.
        """
        current = now or datetime.now(UTC)
        if certificate.status == "revoked":
            raise CertificateRejected(
                f"certificate {certificate.serial} is revoked", reason=Reason.CERTIFICATE_REVOKED
            )
        if certificate.status == "superseded":
            raise CertificateRejected(
                f"certificate {certificate.serial} was already renewed",
                reason=Reason.CERTIFICATE_SUPERSEDED,
            )
        if device.status != "active":
            reason = Reason.DEVICE_REVOKED if device.status == "revoked" else Reason.DEVICE_DISABLED
            raise DeviceRejected(f"device {device.device_id} is {device.status}", reason=reason)
        if certificate.not_before > current + CLOCK_SKEW:
            raise CertificateRejected(
                "certificate is not yet valid", reason=Reason.CERTIFICATE_NOT_YET_VALID
            )
        if certificate.not_after + self.settings.renew_grace < current:
            raise CertificateRejected(
                f"certificate expired at {certificate.not_after.isoformat()}, beyond the "
                f"renewal grace period",
                reason=Reason.RENEWAL_WINDOW_CLOSED,
            )
        identity = DeviceIdentity(device.device_id, device.fleet, self.settings.trust_domain)
        return Issuance(identity, _options(self.settings, current))
