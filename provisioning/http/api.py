"""The provisioning JSON API: thin handlers (validate, authorize, act, render).

Refusals are typed errors; `provisioning.http.problems.STATUS` is the one table that turns their
reason into an HTTP status (see `problems_middleware`). Admin endpoints need a bearer admin
key; device endpoints are authenticated by a bootstrap token or the TLS client certificate.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from aiohttp import web

from provisioning import admin, store
from provisioning.audit.query import EventFilter, query_events
from provisioning.errors import RequestInvalid
from provisioning.http.common import (
    CRL,
    idevid_peer,
    json_response,
    parse_model,
    peer,
    read_body,
    recording_denials,
    require_admin,
    service,
)
from provisioning.pki import crl
from provisioning.pki.csr import parse_csr_pem
from provisioning.telemetry import phase
from schemas.api import EnrollRequest, EventPage, RenewRequest, TokenCreateRequest
from schemas.durations import parse_duration
from schemas.events import EventType, Outcome, Reason
from schemas.migrate import pending

log = logging.getLogger("devicegate.provisioning")

PEM_CRL = "application/x-pem-file"


# --- devices ---------------------------------------------------------------------------


async def enroll(request: web.Request) -> web.Response:
    """``POST /v1/enroll``: a bootstrap token (or an IDevID presented over mutual TLS) and a
    CSR in, a certificate bundle out."""
    async with recording_denials(request, EventType.ENROLL):
        body = parse_model(EnrollRequest, await read_body(request))
        with phase("csr_validation"):
            csr = parse_csr_pem(body.csr)
        if body.token is None and body.hardware_id is not None:
            raise RequestInvalid("hardware_id: only with a token (an IDevID names its hardware)")
    if body.token is None:
        issued = await service(request).enroll_idevid(csr=csr, peer=idevid_peer(request), via="api")
        return json_response(issued.bundle, status=201)
    issued = await service(request).enroll(
        token=body.token, csr=csr, hardware_id=body.hardware_id, peer=peer(request)
    )
    return json_response(issued.bundle, status=201)


async def renew(request: web.Request) -> web.Response:
    """``POST /v1/renew``: the current certificate (TLS) and a CSR in, a new bundle out."""
    async with recording_denials(request, EventType.RENEW):
        body = parse_model(RenewRequest, await read_body(request))
        with phase("csr_validation"):
            csr = parse_csr_pem(body.csr)
    issued = await service(request).renew(csr=csr, peer=peer(request))
    return json_response(issued.bundle, status=201)


async def get_crl(request: web.Request) -> web.Response:
    """``GET /v1/crl``: DER, or PEM (``?format=pem``, ``Accept: application/x-pem-file``)."""
    fmt = request.query.get("format")
    if fmt not in (None, "der", "pem"):
        raise RequestInvalid("format must be der or pem")
    pem = fmt == "pem" or (fmt is None and PEM_CRL in request.headers.get("Accept", ""))
    async with service(request).pool.acquire() as conn:
        current = await request.app[CRL].current(conn)
    return web.Response(
        body=crl.encode(current, pem=pem),
        content_type=PEM_CRL if pem else "application/pkix-crl",
        headers={"Cache-Control": "no-cache"},
    )


# --- health ----------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """The process is up."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The database answers, its schema is this release's (no migration pending: on an
    unmigrated database every enrollment would fail) and the CA is loaded."""
    svc = service(request)
    checks = {"ca": svc.ca is not None, "database": False, "schema": False}
    try:
        async with svc.pool.acquire(timeout=2) as conn:
            checks["database"] = await conn.fetchval("SELECT 1", timeout=2) == 1
            checks["schema"] = not await pending(conn)
    except Exception as exc:  # any failure means "not ready": the checks not done stay False
        log.debug("readyz: %s", exc)
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


# --- admin: tokens ---------------------------------------------------------------------


def _token_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["token_id"])
    except ValueError:
        raise RequestInvalid("token id must be a UUID") from None


async def create_token(request: web.Request) -> web.Response:
    actor = await require_admin(request)
    body = parse_model(TokenCreateRequest, await read_body(request))
    svc = service(request)
    async with svc.pool.acquire() as conn:
        created = await admin.create_token(
            conn, body, actor=actor, instance=svc.settings.instance_id
        )
    return json_response(created, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        tokens = await store.list_tokens(conn, fleet=request.query.get("fleet"))
    return json_response(list(tokens))


async def get_token(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        return json_response(await store.get_token(conn, _token_id(request)))


async def revoke_token(request: web.Request) -> web.Response:
    actor = await require_admin(request)
    svc = service(request)
    async with svc.pool.acquire() as conn:
        info = await admin.revoke_token(
            conn, _token_id(request), actor=actor, instance=svc.settings.instance_id
        )
    return json_response(info)


# --- admin: devices and certificates ---------------------------------------------------


def _limit(request: web.Request, default: int = 100, maximum: int = 1000) -> int:
    text = request.query.get("limit", str(default))
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise RequestInvalid(f"limit must be an integer between 1 and {maximum}")
    return int(text)


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in allowed:
        raise RequestInvalid(f"{name} must be one of {', '.join(allowed)}")
    return value


async def list_devices(request: web.Request) -> web.Response:
    await require_admin(request)
    status = _choice(request, "status", ("active", "disabled", "revoked"))
    async with service(request).pool.acquire() as conn:
        devices = await store.list_devices(
            conn, fleet=request.query.get("fleet"), status=status, limit=_limit(request)
        )
    return json_response(list(devices))


async def show_device(request: web.Request) -> web.Response:
    await require_admin(request)
    async with service(request).pool.acquire() as conn:
        detail = await admin.device_detail(conn, request.match_info["device_id"])
    return json_response(detail)


async def device_action(request: web.Request) -> web.Response:
    """``POST /v1/devices/{id}/disable|enable|revoke``."""
    actor = await require_admin(request)
    action = {
        "disable": admin.disable_device,
        "enable": admin.enable_device,
        "revoke": admin.revoke_device,
    }[request.match_info["action"]]
    svc = service(request)
    async with svc.pool.acquire() as conn:
        device = await action(
            conn, request.match_info["device_id"], actor=actor, instance=svc.settings.instance_id
        )
    return json_response(device)


async def list_certificates(request: web.Request) -> web.Response:
    await require_admin(request)
    status = _choice(request, "status", ("active", "superseded", "revoked"))
    async with service(request).pool.acquire() as conn:
        certificates = await store.list_certificates(
            conn, device_id=request.query.get("device"), status=status, limit=_limit(request)
        )
    return json_response(list(certificates))


async def revoke_certificate(request: web.Request) -> web.Response:
    actor = await require_admin(request)
    svc = service(request)
    async with svc.pool.acquire() as conn:
        info = await admin.revoke_certificate(
            conn, request.match_info["serial"], actor=actor, instance=svc.settings.instance_id
        )
    return json_response(info)


# --- admin: events ---------------------------------------------------------------------


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 timestamp (UTC when no offset) or a duration ago (``10m``, ``7d``).

    Raises:
        RequestInvalid: neither.
    """
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            return (now or datetime.now(UTC)) - parse_duration(text)
        except (ValueError, OverflowError):  # OverflowError: before year 1
            raise RequestInvalid(f"{text!r} is neither a timestamp nor a duration") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _enum(request: web.Request, name: str, enum: type[EventType | Outcome | Reason]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in {member.value for member in enum}:
        raise RequestInvalid(f"unknown {name} {value!r}")
    return value


async def list_events(request: web.Request) -> web.Response:
    """``GET /v1/events``: newest first; ``next_cursor`` continues the listing."""
    await require_admin(request)
    query = request.query
    filters = EventFilter(
        device_id=query.get("device"),
        since=parse_time(query["since"]) if "since" in query else None,
        until=parse_time(query["until"]) if "until" in query else None,
        type=_enum(request, "type", EventType),
        outcome=_enum(request, "outcome", Outcome),
        reason=query.get("reason"),
        peer=query.get("peer"),
    )
    async with service(request).pool.acquire() as conn:
        events, cursor = await query_events(
            conn, filters=filters, limit=_limit(request), cursor=query.get("cursor")
        )
    return json_response(EventPage(events=events, next_cursor=cursor))
