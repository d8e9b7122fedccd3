"""EST (RFC 7030) under ``/.well-known/est/``: cacerts, simpleenroll, simplereenroll.

Wire format (RFC 7030 sections 4.1.3, 4.2): requests carry a base64 DER PKCS#10 CSR with
``Content-Type: application/pkcs10``; responses are base64 DER certs-only PKCS#7 with
``Content-Transfer-Encoding: base64``. ``simpleenroll`` is authenticated by the bootstrap
token (HTTP Basic password, or Bearer) or, without credentials, by a manufacturer
certificate (IDevID) presented in the TLS handshake (RFC 7030 section 3.3.2, with the
channel binding of RFC 9266 in the CSR's challengePassword); ``simplereenroll`` by the TLS
client certificate.
Both go through the same service as the JSON API, so policy and events are identical.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from provisioning.errors import RequestInvalid, TokenRejected
from provisioning.http.common import idevid_peer, peer, read_body, recording_denials, service
from provisioning.pki.csr import parse_csr_base64_der
from provisioning.telemetry import phase
from schemas.events import EventType, Reason

PKCS7_CERTS = "application/pkcs7-mime; smime-type=certs-only"
PKCS10 = "application/pkcs10"


def certs_only(certificates: list[x509.Certificate]) -> bytes:
    """Base64 (76-column lines) of a DER certs-only PKCS#7 holding ``certificates``."""
    return base64.encodebytes(pkcs7.serialize_certificates(certificates, Encoding.DER))


def _pkcs7_response(certificates: list[x509.Certificate], content_type: str) -> web.Response:
    response = web.Response(body=certs_only(certificates))
    # Set verbatim: aiohttp's content_type setter would drop the smime-type parameter.
    response.headers["Content-Type"] = content_type
    response.headers["Content-Transfer-Encoding"] = "base64"
    return response


def bootstrap_token(authorization: str | None) -> str:
    """The bootstrap token from ``Basic`` (as the password) or ``Bearer`` credentials.

    Raises:
        TokenRejected: no credentials, or unreadable ones (reason token_invalid).
    """
    if not authorization:
        raise TokenRejected("a bootstrap token is required (HTTP Basic password or Bearer)")
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return credentials
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise TokenRejected("malformed Basic credentials") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise TokenRejected("a bootstrap token is required (HTTP Basic password or Bearer)")


def _check_content_type(request: web.Request) -> None:
    if request.content_type != PKCS10:
        raise RequestInvalid(f"Content-Type must be {PKCS10}", reason=Reason.UNSUPPORTED_MEDIA_TYPE)


async def cacerts(request: web.Request) -> web.Response:
    """The CA chain (issuing, root) that devices should trust."""
    ca = service(request).ca
    return _pkcs7_response([ca.issuing, ca.root], "application/pkcs7-mime")


async def simpleenroll(request: web.Request) -> web.Response:
    authorization = request.headers.get("Authorization")
    idevid = not authorization and peer(request).certificate_der is not None
    async with recording_denials(request, EventType.ENROLL):
        _check_content_type(request)
        token = None if idevid else bootstrap_token(authorization)
        body = await read_body(request)
        with phase("csr_validation"):
            csr = parse_csr_base64_der(body)
    if token is None:
        issued = await service(request).enroll_idevid(csr=csr, peer=idevid_peer(request), via="est")
        return _pkcs7_response([issued.certificate], PKCS7_CERTS)
    issued = await service(request).enroll(
        token=token, csr=csr, hardware_id=None, peer=peer(request)
    )
    return _pkcs7_response([issued.certificate], PKCS7_CERTS)


async def simplereenroll(request: web.Request) -> web.Response:
    async with recording_denials(request, EventType.RENEW):
        _check_content_type(request)
        body = await read_body(request)
        with phase("csr_validation"):
            csr = parse_csr_base64_der(body)
    issued = await service(request).renew(csr=csr, peer=peer(request), via="est")
    return _pkcs7_response([issued.certificate], PKCS7_CERTS)
