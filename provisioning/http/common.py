"""What the HTTP handlers share: application keys, the peer, bodies, the error middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from types import ModuleType
from typing import TypeVar

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ValidationError

from provisioning import admin
from provisioning.db import DatabaseUnavailable
from provisioning.enrollment.idevid import EXPORTER_LABEL, EXPORTER_LENGTH
from provisioning.enrollment.service import Peer, ProvisioningService
from provisioning.errors import RequestInvalid, Unauthorized
from provisioning.http.problems import problem_response, reason_for_status
from provisioning.pki.crl import CrlCache
from schemas.errors import DevicegateError
from schemas.events import EventType, Reason, holds_nul
from schemas.validation import sentence

log = logging.getLogger("devicegate.provisioning")

_tlsext: ModuleType | None
try:  # the C accelerator: keying material export (IDevID channel binding)
    from gateway import _tlsext
except ImportError:  # pragma: no cover - built by `make .venv/.installed`
    _tlsext = None

M = TypeVar("M", bound=BaseModel)

SERVICE = web.AppKey("service", ProvisioningService)
CRL = web.AppKey("crl", CrlCache)


def service(request: web.Request) -> ProvisioningService:
    return request.app[SERVICE]


def peer(request: web.Request) -> Peer:
    """Address, TLS parameters and client certificate (DER) of the connection, and the
    route whose refusal budget its refusals count against."""
    route = f"{request.method} {request.path}"
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return Peer(address=request.remote, route=route)
    cipher = ssl_object.cipher()
    return Peer(
        address=request.remote,
        tls_version=ssl_object.version(),
        tls_cipher=cipher[0] if cipher else None,
        certificate_der=ssl_object.getpeercert(binary_form=True),
        route=route,
    )


def idevid_peer(request: web.Request) -> Peer:
    """`peer` with the connection's RFC 9266 tls-exporter value, for channel binding (TLS
    1.3 only; None without the TLS accelerator, ``gateway._tlsext``)."""
    found = peer(request)
    if found.tls_version != "TLSv1.3" or _tlsext is None or request.transport is None:
        return found
    ssl_object = request.transport.get_extra_info("ssl_object")
    try:
        exporter = _tlsext.export_keying_material(ssl_object, EXPORTER_LABEL, EXPORTER_LENGTH, None)
    except (TypeError, ValueError):
        return found
    return replace(found, exporter=exporter)


async def read_body(request: web.Request) -> bytes:
    """The request body, refused before it is read when it announces more than the limit.

    Raises:
        RequestInvalid: reason body_too_large.
    """
    limit = service(request).settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestInvalid(
            f"request body larger than {limit} bytes", reason=Reason.BODY_TOO_LARGE
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked bodies, counted by aiohttp
        raise RequestInvalid(
            f"request body larger than {limit} bytes", reason=Reason.BODY_TOO_LARGE
        ) from None


def parse_model(model: type[M], body: bytes) -> M:
    """Validate a JSON body.

    Raises:
        RequestInvalid: not JSON, or not the model; the detail names the first bad field.
    """
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestInvalid(f"{where}: {sentence(first)}") from None
    # In valid JSON a U+0000 can only be the escape \u0000 (a raw control character is
    # refused by the parser), so a body without one needs no walk over the parsed model.
    if b"\\u0000" in body and holds_nul(parsed.model_dump()):
        raise RequestInvalid("text must not contain U+0000 (PostgreSQL cannot store it)")
    return parsed


def json_response(model: BaseModel | list[BaseModel], status: int = 200) -> web.Response:
    if isinstance(model, list):
        text = "[" + ",".join(item.model_dump_json() for item in model) + "]"
    else:
        text = model.model_dump_json()
    return web.Response(status=status, text=text, content_type="application/json")


@asynccontextmanager
async def recording_denials(request: web.Request, type: EventType) -> AsyncIterator[None]:
    """Record refusals raised before the service is reached (body, JSON, CSR policy)."""
    try:
        yield
    except DevicegateError as exc:
        await service(request).record_denied(type, exc, peer(request))
        raise


async def require_admin(request: web.Request) -> str:
    """The admin key's name, for ``detail.actor``.

    Raises:
        Unauthorized: no bearer admin key, or an unknown or revoked one.
    """
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized("an admin key is required (Authorization: Bearer dgk_...)")
    async with service(request).pool.acquire() as conn:
        name = await admin.authenticate_admin(conn, header)
    if name is None:
        raise Unauthorized("unknown or revoked admin key")
    return name


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal becomes a problem document; nothing else leaves as an error page."""
    if "\x00" in request.path or any(holds_nul(item) for item in request.query.items()):
        return problem_response(Reason.REQUEST_INVALID, "U+0000 in the path or query")
    try:
        return await handler(request)
    except DevicegateError as exc:
        if isinstance(exc, DatabaseUnavailable):
            return problem_response(Reason.SERVICE_UNAVAILABLE, str(exc))
        return problem_response(exc.reason, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(reason_for_status(exc.status), exc.reason)
    except asyncpg.DataError as exc:  # SQLSTATE class 22: a value PostgreSQL refuses
        log.warning("%s %s: %s", request.method, request.path, exc)
        return problem_response(Reason.REQUEST_INVALID, "a value is out of range or not valid")
    except (
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        ConnectionError,
        TimeoutError,
    ) as exc:
        log.warning("database unavailable: %s", exc)
        return problem_response(Reason.SERVICE_UNAVAILABLE, "database unavailable")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(Reason.INTERNAL_ERROR)
