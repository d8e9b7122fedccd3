"""The one table from reason code to HTTP status, and RFC 9457 problem responses."""

from __future__ import annotations

from aiohttp import web

from schemas.api import Problem
from schemas.events import Reason

PROBLEM_TYPE = "application/problem+json"

STATUS: dict[Reason, tuple[int, str]] = {
    Reason.REQUEST_INVALID: (400, "Invalid request"),
    Reason.CSR_INVALID: (400, "Invalid certificate signing request"),
    Reason.KEY_NOT_ALLOWED: (400, "Key type not allowed"),
    Reason.TOKEN_INVALID: (401, "Invalid bootstrap token"),
    Reason.TOKEN_EXPIRED: (401, "Bootstrap token expired"),
    Reason.TOKEN_EXHAUSTED: (401, "Bootstrap token exhausted"),
    Reason.TOKEN_REVOKED: (401, "Bootstrap token revoked"),
    Reason.UNAUTHORIZED: (401, "Unauthorized"),
    Reason.NO_CLIENT_CERTIFICATE: (401, "Client certificate required"),
    Reason.UNKNOWN_ISSUER: (401, "Client certificate from an unknown issuer"),
    Reason.CERTIFICATE_INVALID: (401, "Invalid client certificate"),
    Reason.IDEVID_UNTRUSTED: (401, "Manufacturer certificate not trusted"),
    Reason.IDEVID_EXPIRED: (401, "Manufacturer certificate expired or not yet valid"),
    Reason.IDEVID_BLOCKED: (403, "Manufacturer certificate blocked"),
    Reason.IDEVID_NOT_ALLOWLISTED: (403, "Manufacturer certificate not in the fleet's manifest"),
    Reason.CHANNEL_BINDING_MISMATCH: (403, "Channel binding does not match this connection"),
    Reason.DEVICE_UNKNOWN: (403, "Unknown device"),
    Reason.CERTIFICATE_REVOKED: (403, "Certificate revoked"),
    Reason.CERTIFICATE_SUPERSEDED: (403, "Certificate already renewed"),
    Reason.CERTIFICATE_NOT_YET_VALID: (403, "Certificate not yet valid"),
    Reason.CERTIFICATE_EXPIRED: (403, "Certificate expired"),
    Reason.RENEWAL_WINDOW_CLOSED: (403, "Certificate expired beyond the renewal grace period"),
    Reason.DEVICE_DISABLED: (403, "Device disabled"),
    Reason.DEVICE_REVOKED: (403, "Device revoked"),
    Reason.NOT_FOUND: (404, "Not found"),
    Reason.METHOD_NOT_ALLOWED: (405, "Method not allowed"),
    Reason.HARDWARE_ID_TAKEN: (409, "Hardware id already enrolled"),
    Reason.CONFLICT: (409, "Conflict"),
    Reason.BODY_TOO_LARGE: (413, "Request body too large"),
    Reason.UNSUPPORTED_MEDIA_TYPE: (415, "Unsupported media type"),
    Reason.RATE_LIMITED: (429, "Too many requests"),
    Reason.INTERNAL_ERROR: (500, "Internal error"),
    Reason.SERVICE_UNAVAILABLE: (503, "Service unavailable"),
    Reason.SIGNER_UNAVAILABLE: (503, "Certificate signer unavailable"),
}
"""Reason -> (HTTP status, title). A reason not listed is a server bug: 500.

The refusal budget (`provisioning.refusal_budget`) changes no status: a refusal beyond it
is answered exactly as within it and only its audit event is summarised. 429 comes from
the token limiter alone (`provisioning.http.ratelimit`)."""

_BY_STATUS: dict[int, Reason] = {
    400: Reason.REQUEST_INVALID,
    404: Reason.NOT_FOUND,
    405: Reason.METHOD_NOT_ALLOWED,
    413: Reason.BODY_TOO_LARGE,
    415: Reason.UNSUPPORTED_MEDIA_TYPE,
}


def reason_for_status(status: int) -> Reason:
    """The reason for an error aiohttp raised itself (routing, body size)."""
    default = Reason.INTERNAL_ERROR if status >= 500 else Reason.REQUEST_INVALID
    return _BY_STATUS.get(status, default)


def problem_response(reason: Reason, detail: str | None = None) -> web.Response:
    """An ``application/problem+json`` response for ``reason``."""
    status, title = STATUS.get(reason, STATUS[Reason.INTERNAL_ERROR])
    problem = Problem(
        type=f"urn:devicegate:problem:{reason.value}",
        title=title,
        status=status,
        detail=detail,
        reason=reason.value,
    )
    response = web.Response(
        status=status, body=problem.model_dump_json(), content_type=PROBLEM_TYPE
    )
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="devicegate", Bearer realm="devicegate"'
    return response
