"""Console sessions: a random cookie, its sha256 in ``console_sessions``, a CSRF token.

Invariants:
- The cookie value is 256 random bits and is never stored: the table keeps its sha256, so a
  read of the table (a backup, a replica) cannot be replayed as a session.
- Every lookup joins ``admin_keys``: revoking the admin key ends its sessions at once.
- A session ends after `IDLE` without a request, or `LIFETIME` after login, or at logout.
- A new id at every login (no fixation); the admin key itself lives only in the login POST.
- Sessions are rows in PostgreSQL, so any provisioning replica honours them.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiohttp import web

from provisioning.tokens import ADMIN_KEY_PREFIX, secret_hash

Connection = Any  # asyncpg.Connection

COOKIE = "dg_console"
PATH = "/console"
IDLE = timedelta(minutes=30)
LIFETIME = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser: which admin key, and the token its forms must carry."""

    actor: str
    admin_key_id: uuid.UUID
    csrf_token: str


def _digest(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode()).digest()


async def admin_key(conn: Connection, secret: str) -> tuple[uuid.UUID, str] | None:
    """(id, name) of the unrevoked admin key ``secret``, like the API's bearer check."""
    secret = secret.strip()
    if not secret.startswith(ADMIN_KEY_PREFIX):
        return None
    row = await conn.fetchrow(
        "SELECT id, name FROM admin_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        secret_hash(secret),
    )
    return None if row is None else (row["id"], row["name"])


async def create(
    conn: Connection, *, admin_key_id: uuid.UUID, actor: str, peer: str | None
) -> tuple[str, Session]:
    """A new session; returns the cookie value (shown to the browser only) and the session."""
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
    await conn.execute(
        """INSERT INTO console_sessions (id_hash, admin_key_id, csrf_token, peer_address,
               expires_at) VALUES ($1, $2, $3, $4, now() + $5::interval)""",
        _digest(cookie), admin_key_id, csrf, peer, LIFETIME,
    )  # fmt: skip
    return cookie, Session(actor=actor, admin_key_id=admin_key_id, csrf_token=csrf)


async def load(conn: Connection, cookie: str | None) -> Session | None:
    """The live session of ``cookie`` (its idle clock restarted), or ``None``."""
    if not cookie or len(cookie) > 128:
        return None
    row = await conn.fetchrow(
        """UPDATE console_sessions s SET last_seen = now()
           FROM admin_keys k
           WHERE s.id_hash = $1 AND k.id = s.admin_key_id AND k.revoked_at IS NULL
             AND s.expires_at > now() AND s.last_seen > now() - $2::interval
           RETURNING k.name, s.admin_key_id, s.csrf_token""",
        _digest(cookie), IDLE,
    )  # fmt: skip
    if row is None:
        return None
    return Session(
        actor=row["name"], admin_key_id=row["admin_key_id"], csrf_token=row["csrf_token"]
    )


async def delete(conn: Connection, cookie: str | None) -> None:
    if cookie:
        await conn.execute("DELETE FROM console_sessions WHERE id_hash = $1", _digest(cookie))


def set_cookie(response: web.StreamResponse, value: str) -> None:
    """The session cookie: HttpOnly, Secure, SameSite=Strict, Path=/console."""
    response.set_cookie(
        COOKIE, value, path=PATH, secure=True, httponly=True, samesite="Strict",
        max_age=int(LIFETIME.total_seconds()),
    )  # fmt: skip


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path=PATH, secure=True, httponly=True, samesite="Strict")


# aiohttp >= 3.13 has typed request keys; older ones take a string.
_REQUEST_KEY: Any = (
    web.RequestKey("console_session", Session)
    if hasattr(web, "RequestKey")
    else "devicegate.console.session"
)


def attach(request: web.Request, session: Session) -> None:
    request[_REQUEST_KEY] = session


def current_session(request: web.Request) -> Session | None:
    """The session `attach` put on this request, if any."""
    session: Session | None = request.get(_REQUEST_KEY)
    return session


def require(request: web.Request) -> Session:
    """The request's session (the auth middleware guarantees one on protected routes)."""
    session = current_session(request)
    if session is None:
        raise web.HTTPUnauthorized(text="login required")
    return session
