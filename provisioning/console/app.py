"""The console sub-application: routes, the session gate, security headers, HTML errors.

Mounted at ``/console`` on the provisioning app by `setup`. Every route except the login
form and the static files needs a session: a GET without one is sent to the login page,
anything else gets 401. Refusals render as HTML pages, not problem documents.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources

import asyncpg
from aiohttp import web

from provisioning.console import auth, chains, devices, events, integrity, live, overview, rollup
from provisioning.console.html import BANNER, Html, escape, page, tag, url
from provisioning.console.sessions import COOKIE, attach, load
from provisioning.console.state import CHAINS, FILLER, LIVE, ChainRuns, LiveStreams
from provisioning.db import DatabaseUnavailable
from provisioning.enrollment.service import ProvisioningService
from provisioning.http.common import SERVICE, Handler
from provisioning.http.problems import STATUS
from schemas.errors import DevicegateError
from schemas.events import Reason

log = logging.getLogger("devicegate.console")

PREFIX = "/console"
_STATIC = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
PUBLIC = frozenset({"/console/login", *(f"/console/static/{name}" for name in _STATIC)})

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith(f"{PREFIX}/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def _error_page(request: web.Request, status: int, title: str, detail: str | None) -> web.Response:
    body = Html(
        tag("h1", title)
        + (tag("p", detail) if detail else Html(""))
        + tag("p", tag("a", "Back to the overview", href=f"{PREFIX}/"))
    )
    return page(request, title=title, body=body, status=status)


@web.middleware
async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Session check, then HTML error pages for every refusal."""
    try:
        if request.path not in PUBLIC:
            async with request.app[SERVICE].pool.acquire() as conn:
                session = await load(conn, request.cookies.get(COOKIE))
            if session is None:
                if request.method in ("GET", "HEAD") and not request.path.endswith("/live"):
                    raise web.HTTPSeeOther(url(f"{PREFIX}/login", next=request.path_qs))
                raise web.HTTPUnauthorized(text="log in to the console first")
            attach(request, session)
            if request.method == "GET" and not request.path.endswith(("/live", ".csv", ".json")):
                watch = request.app[integrity.WATCH]
                await watch.poke()
                request[BANNER] = watch.banner(request.app[CHAINS])
        return await handler(request)
    except DevicegateError as exc:
        if isinstance(exc, DatabaseUnavailable):
            return _error_page(request, 503, "Service unavailable", "database unavailable")
        status, title = STATUS.get(exc.reason, STATUS[Reason.INTERNAL_ERROR])
        return _error_page(request, status, title, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_page(request, exc.status, exc.reason, exc.text)
    except asyncpg.DataError:  # a value PostgreSQL refuses (out of range, U+0000)
        return _error_page(request, 400, "Invalid request", "a value is out of range or not valid")
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError) as exc:
        log.warning("console: database unavailable: %s", exc)
        return _error_page(request, 503, "Service unavailable", "database unavailable")


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound()
    body = (resources.files("provisioning.console") / "static" / name).read_bytes()
    return web.Response(
        body=body, content_type=_STATIC[name], charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )  # fmt: skip


async def _stop_streams(app: web.Application) -> None:
    app[LIVE].close_all()


async def _start_filler(app: web.Application) -> None:
    """Keep the overview's hourly rollup filled, in the background (`rollup.run`)."""
    app[FILLER].append(
        asyncio.create_task(rollup.run(app[SERVICE].pool), name="console-rollup-filler")
    )


async def _stop_watch(app: web.Application) -> None:
    await app[integrity.WATCH].close()


async def _stop_filler(app: web.Application) -> None:
    for task in app[FILLER]:
        task.cancel()
    await asyncio.gather(*app[FILLER], return_exceptions=True)


def build(service: ProvisioningService) -> web.Application:
    """The console application over the provisioning service."""
    console = web.Application(middlewares=[_gate])
    console[SERVICE] = service
    console[LIVE] = LiveStreams()
    console[CHAINS] = ChainRuns(service.settings.database_url)
    console[integrity.WATCH] = integrity.ChainWatch(service.settings.database_url)
    console.on_response_prepare.append(_security_headers)
    console[FILLER] = []
    console.on_startup.append(_start_filler)
    console.on_shutdown.append(_stop_streams)
    console.on_shutdown.append(_stop_filler)
    console.on_shutdown.append(_stop_watch)
    console.add_routes(
        [
            web.get("/", overview.show),
            web.get("/login", auth.login_form),
            web.post("/login", auth.login),
            web.post("/logout", auth.logout),
            web.get("/events", events.show),
            web.get(r"/events/export.{format:csv|json}", events.export),
            web.get("/events/live", live.stream),
            web.get("/devices/{device_id}", devices.show),
            web.get(r"/devices/{device_id}/{action:disable|enable|revoke}", devices.confirm),
            web.post(r"/devices/{device_id}/{action:disable|enable|revoke}", devices.act),
            web.post("/devices/{device_id}/attributes", devices.set_attribute),
            web.get("/chains", chains.show),
            web.post("/chains/verify", chains.verify),
            web.get("/static/{name}", _static),
        ]
    )
    return console


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect(f"{PREFIX}/")


def setup(app: web.Application) -> None:
    """Mount the console at ``/console/`` on the provisioning app (after ``app[SERVICE]``)."""
    app.router.add_get(PREFIX, _to_console)
    app.add_subapp(PREFIX, build(app[SERVICE]))


__all__ = ["SECURITY_HEADERS", "build", "escape", "setup"]
