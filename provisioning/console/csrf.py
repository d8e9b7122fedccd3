"""CSRF defences of the console's POST forms.

- Every form of a logged-in page carries the session's token in a hidden ``csrf`` field,
  compared in constant time (`hmac.compare_digest`).
- The login form, which has no session yet, uses a double-submit token: a random value in a
  short-lived cookie (SameSite=Strict) and the same value in the form.
- A POST whose ``Origin`` (or, without a useful one, ``Sec-Fetch-Site``) says another site
  sent it is refused before any token is looked at.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping

from aiohttp import web

from provisioning.console.sessions import PATH

FIELD = "csrf"
LOGIN_COOKIE = "dg_console_login"


def tokens_match(expected: str | None, given: object) -> bool:
    """Constant-time comparison; a missing or non-text token never matches."""
    if not expected or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def same_origin(request: web.Request) -> bool:
    """False when the browser tells us another origin sent this request.

    ``Origin: null`` is what browsers send under ``Referrer-Policy: no-referrer`` (which the
    console sets), so it says nothing: ``Sec-Fetch-Site`` is consulted, and the token decides.
    """
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null":
        return origin == f"{request.scheme}://{request.host}"
    return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")


def check(request: web.Request, form: Mapping[str, object], expected: str | None) -> None:
    """Raises: HTTPForbidden: cross-site, or the token is missing or wrong."""
    if not same_origin(request) or not tokens_match(expected, form.get(FIELD)):
        raise web.HTTPForbidden(text="missing or invalid CSRF token")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def set_login_cookie(response: web.StreamResponse, token: str) -> None:
    """The login form's double-submit cookie (15 minutes)."""
    response.set_cookie(
        LOGIN_COOKIE, token, path=PATH, secure=True, httponly=True, samesite="Strict",
        max_age=900,
    )  # fmt: skip
