"""Typed refusals of the provisioning service; each carries the reason code it is recorded under.

The HTTP status of each reason lives in one table, `provisioning.http.problems.STATUS`; these
classes only say *what* went wrong, never how it is rendered.
"""

from __future__ import annotations

from schemas.errors import DevicegateError
from schemas.events import Reason

__all__ = [
    "CertificateRejected",
    "Conflict",
    "CsrInvalid",
    "DeviceRejected",
    "HardwareIdTaken",
    "IdevidRejected",
    "NotFound",
    "RequestInvalid",
    "TokenRejected",
    "Unauthorized",
]


class TokenRejected(DevicegateError):
    """A bootstrap token that is unknown, expired, exhausted or revoked.

    ``token_id`` and ``fleet`` name the token when it exists, for the denied event.
    """

    reason = Reason.TOKEN_INVALID

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        token_id: str | None = None,
        fleet: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.token_id = token_id
        self.fleet = fleet


class CsrInvalid(DevicegateError):
    """A CSR that does not parse or whose signature does not verify."""

    reason = Reason.CSR_INVALID


class HardwareIdTaken(DevicegateError):
    """The hardware id belongs to an enrolled device and the token may not re-enroll it."""

    reason = Reason.HARDWARE_ID_TAKEN


class CertificateRejected(DevicegateError):
    """A client certificate that may not be used (absent, revoked, superseded, too old...)."""

    reason = Reason.CERTIFICATE_INVALID


class DeviceRejected(DevicegateError):
    """The device is disabled or revoked."""

    reason = Reason.DEVICE_DISABLED


class Unauthorized(DevicegateError):
    """No credentials, or wrong ones."""

    reason = Reason.UNAUTHORIZED


class NotFound(DevicegateError):
    """No such token, device, certificate or key."""

    reason = Reason.NOT_FOUND


class Conflict(DevicegateError):
    """The change contradicts the current state (e.g. enabling a revoked device)."""

    reason = Reason.CONFLICT


class RequestInvalid(DevicegateError):
    """A request body or parameter that does not validate."""

    reason = Reason.REQUEST_INVALID


class IdevidRejected(DevicegateError):
    """A manufacturer certificate (IDevID) that may not enroll: untrusted, expired, blocked,
    not on a required allowlist, or a channel binding that does not match the connection.

    ``idevid`` names the certificate presented (issuer, serial, fingerprint) when it parsed,
    and ``fleet`` the fleet that refused it when one was found, for the denied event.
    """

    reason = Reason.IDEVID_UNTRUSTED

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        idevid: dict[str, str] | None = None,
        fleet: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.idevid = idevid
        self.fleet = fleet
