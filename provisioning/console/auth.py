"""Logging in and out of the console with an admin key.

A login is an authentication decision, so it is recorded like the others: an ``admin``
event, allowed (``admin_action``, ``detail.actor`` = the key's name) or denied
(``unauthorized``), with the peer address, on the provisioning chain. Denied logins count
against the route's per-address refusal budget like the other unauthenticated routes
(`provisioning.refusal_budget`): beyond it they are summarised, with exact counts.
"""

from __future__ import annotations

from aiohttp import web

from provisioning.console import csrf, sessions
from provisioning.console.html import Html, page, render
from provisioning.errors import Unauthorized
from provisioning.eventlog import append_event
from provisioning.http.common import SERVICE, peer
from schemas.events import EventType, Outcome, Reason

HOME = "/console/"


def _next(target: object) -> str:
    """Where to go after login: only a path inside the console (no open redirect)."""
    if (
        isinstance(target, str)
        and target.startswith("/console/")
        and not target.startswith("/console//")
        and "\\" not in target
        and target.isprintable()
        and len(target) < 2000
    ):
        return target
    return HOME


def _form(
    request: web.Request, *, message: str = "", status: int = 200, target: object = None
) -> web.Response:
    token = csrf.new_token()
    response = page(
        request, title="Log in", nav=False, status=status,
        body=render(
            "login.html", next=_next(target or request.query.get("next")),
            message=Html(f'<p class="error" role="alert">{message}</p>') if message else "",
            csrf=token,
        ),
    )  # fmt: skip
    csrf.set_login_cookie(response, token)
    return response


async def login_form(request: web.Request) -> web.Response:
    """``GET /console/login``."""
    return _form(request)


async def _record(request: web.Request, *, actor: str | None) -> None:
    service = request.app[SERVICE]
    if actor is None:
        await service.record_denied(
            EventType.ADMIN,
            Unauthorized("unknown or revoked admin key"),
            peer(request),
            detail={"action": "console_login"},
        )
        return
    async with service.pool.acquire() as conn, conn.transaction():
        await append_event(
            conn,
            instance=service.settings.instance_id,
            type=EventType.ADMIN,
            outcome=Outcome.ALLOWED,
            reason=Reason.ADMIN_ACTION,
            peer_address=request.remote,
            detail={"action": "console_login", "actor": actor},
        )


async def login(request: web.Request) -> web.Response:
    """``POST /console/login``: the key is checked against ``admin_keys`` like the API's
    bearer key; on success a new session and a 303 to where the user was going."""
    form = await request.post()
    csrf.check(request, form, request.cookies.get(csrf.LOGIN_COOKIE))
    secret = form.get("key")
    service = request.app[SERVICE]
    found = None
    if isinstance(secret, str) and 0 < len(secret) <= 256:
        async with service.pool.acquire() as conn:
            found = await sessions.admin_key(conn, secret)
    if found is None:
        await _record(request, actor=None)
        return _form(
            request, message="Unknown or revoked admin key.", status=401, target=form.get("next")
        )
    key_id, name = found
    async with service.pool.acquire() as conn:
        cookie, _ = await sessions.create(
            conn, admin_key_id=key_id, actor=name, peer=request.remote
        )
    await _record(request, actor=name)
    response = web.HTTPSeeOther(_next(form.get("next")))
    sessions.set_cookie(response, cookie)
    response.del_cookie(csrf.LOGIN_COOKIE, path=sessions.PATH)
    raise response


async def logout(request: web.Request) -> web.Response:
    """``POST /console/logout`` (CSRF-checked): the session row is deleted."""
    session = sessions.require(request)
    form = await request.post()
    csrf.check(request, form, session.csrf_token)
    async with request.app[SERVICE].pool.acquire() as conn:
        await sessions.delete(conn, request.cookies.get(sessions.COOKIE))
    response = web.HTTPSeeOther("/console/login")
    sessions.clear_cookie(response)
    raise response
