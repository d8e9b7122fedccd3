"""The console's defences, over HTTP without a browser: the session gate, CSRF, escaping,
cookie flags and security headers."""

from __future__ import annotations

import re

import aiohttp
import asyncpg
import pytest

from provisioning import admin
from provisioning.eventlog import append_event
from schemas.certificates import describe_certificate, presented_detail
from schemas.events import EventType, Outcome, Reason
from tests.console.conftest import INSTANCE, ConsoleServer, csrf_of, log_in

PROTECTED = [
    ("GET", "/console/"),
    ("GET", "/console/?range=week"),
    ("GET", "/console/events"),
    ("GET", "/console/events?reason=certificate_expired"),
    ("GET", "/console/events/export.csv"),
    ("GET", "/console/events/export.json"),
    ("GET", "/console/events/live"),
    ("GET", "/console/devices/dev-00001"),
    ("GET", "/console/devices/dev-00001/revoke"),
    ("GET", "/console/chains"),
    ("POST", "/console/devices/dev-00001/revoke"),
    ("POST", "/console/devices/dev-00001/disable"),
    ("POST", "/console/chains/verify"),
    ("POST", "/console/logout"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_route_refuses_without_a_session(
    anonymous: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with anonymous.request(method, path, allow_redirects=False) as response:
        if method == "GET" and not path.endswith("/live"):
            assert response.status == 303
            assert response.headers["Location"].startswith("/console/login?next=")
        else:
            assert response.status in (401, 403)


async def test_a_forged_session_cookie_is_refused(anonymous: aiohttp.ClientSession) -> None:
    async with anonymous.get(
        "/console/events", headers={"Cookie": "dg_console=forged"}, allow_redirects=False
    ) as response:
        assert response.status == 303


async def test_login_sets_a_strict_cookie_and_never_puts_the_key_in_a_url(
    anonymous: aiohttp.ClientSession, console_key: str
) -> None:
    async with anonymous.get("/console/login") as response:
        page = await response.text()
        login_cookie = response.headers["Set-Cookie"]
    assert 'method="post"' in page and 'type="password"' in page
    assert "HttpOnly" in login_cookie and "Secure" in login_cookie
    async with anonymous.post(
        "/console/login", data={"key": console_key, "csrf": csrf_of(page), "next": "/console/"},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 303
        assert console_key not in response.headers["Location"]
        cookies = response.headers.getall("Set-Cookie")
    session = next(c for c in cookies if c.startswith("dg_console="))
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in session.split(";")}
    assert "httponly" in flags and "secure" in flags
    assert flags["samesite"].lower() == "samesite=strict"
    assert flags["path"] == "Path=/console"
    assert console_key not in session


async def test_a_wrong_key_is_refused_and_recorded(
    anonymous: aiohttp.ClientSession, console_server: ConsoleServer
) -> None:
    async with anonymous.get("/console/login") as response:
        token = csrf_of(await response.text())
    async with anonymous.post(
        "/console/login", data={"key": "dgk_not-a-key", "csrf": token}, allow_redirects=False
    ) as response:
        assert response.status == 401
        assert "Unknown or revoked admin key" in await response.text()
    conn = await asyncpg.connect(console_server.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT outcome, reason FROM auth_events WHERE type = 'admin' "
            "AND detail->>'action' = 'console_login' ORDER BY time DESC LIMIT 1"
        )
    finally:
        await conn.close()
    assert (row["outcome"], row["reason"]) == ("denied", "unauthorized")


async def test_login_without_its_csrf_cookie_is_refused(
    anonymous: aiohttp.ClientSession, console_key: str
) -> None:
    async with anonymous.get("/console/login") as response:
        token = csrf_of(await response.text())
    anonymous.cookie_jar.clear()
    async with anonymous.post(
        "/console/login", data={"key": console_key, "csrf": token}, allow_redirects=False
    ) as response:
        assert response.status == 403


async def test_no_open_redirect_after_login(
    anonymous: aiohttp.ClientSession, console_key: str
) -> None:
    async with anonymous.get("/console/login") as response:
        token = csrf_of(await response.text())
    async with anonymous.post(
        "/console/login",
        data={"key": console_key, "csrf": token, "next": "//evil.example/console/"},
        allow_redirects=False,
    ) as response:
        assert response.headers["Location"] == "/console/"


async def _status(conn: asyncpg.Connection, device_id: str) -> str:
    status: str = await conn.fetchval("SELECT status FROM devices WHERE device_id = $1", device_id)
    return status


@pytest.mark.parametrize(
    ("form", "headers"),
    [
        ({}, {}),  # no token
        ({"csrf": "wrong"}, {}),  # forged token
        ({"csrf": ""}, {}),
        ("right", {"Origin": "https://evil.example"}),  # right token, cross-site
        ("right", {"Sec-Fetch-Site": "cross-site"}),
    ],
)
async def test_forged_forms_are_refused(
    admin_client: tuple[aiohttp.ClientSession, str],
    console_server: ConsoleServer,
    form: dict[str, str] | str,
    headers: dict[str, str],
) -> None:
    client, token = admin_client
    data = {"csrf": token} if form == "right" else form
    conn = await asyncpg.connect(console_server.database_url)
    try:
        before = await _status(conn, "dev-00005")
        async with client.post(
            "/console/devices/dev-00005/revoke", data=data, headers=headers,
            allow_redirects=False,
        ) as response:  # fmt: skip
            assert response.status == 403
        assert await _status(conn, "dev-00005") == before == "active"
    finally:
        await conn.close()


async def test_a_token_replayed_from_another_session_is_refused(
    admin_client: tuple[aiohttp.ClientSession, str],
    tls_context: object,
    console_server: ConsoleServer,
    console_key: str,
) -> None:
    client, _ = admin_client
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(
        base_url=console_server.url, connector=aiohttp.TCPConnector(ssl=tls_context),
        cookie_jar=jar,
    ) as other:  # fmt: skip
        other_token = await log_in(other, console_key)
    async with client.post(
        "/console/chains/verify", data={"csrf": other_token, "window": "day"},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 403


async def test_logout_ends_the_session_for_good(
    admin_client: tuple[aiohttp.ClientSession, str],
) -> None:
    client, token = admin_client
    cookie = client.cookie_jar.filter_cookies(client._base_url.with_path("/console/"))
    stolen = cookie["dg_console"].value
    async with client.post("/console/logout", data={"csrf": token}, allow_redirects=False) as r:
        assert r.status == 303
    async with client.get(
        "/console/", headers={"Cookie": f"dg_console={stolen}"}, allow_redirects=False
    ) as response:
        assert response.status == 303  # replaying the old cookie leads to the login page


async def test_revoking_the_admin_key_ends_its_sessions(
    anonymous: aiohttp.ClientSession, console_server: ConsoleServer
) -> None:
    conn = await asyncpg.connect(console_server.database_url)
    try:
        created = await admin.create_admin_key(conn, "short-lived", actor="cli", instance=INSTANCE)
        await log_in(anonymous, created.key)
        async with anonymous.get("/console/", allow_redirects=False) as response:
            assert response.status == 200
        await admin.revoke_admin_key(conn, "short-lived", actor="cli", instance=INSTANCE)
    finally:
        await conn.close()
    async with anonymous.get("/console/", allow_redirects=False) as response:
        assert response.status == 303


HOSTILE_DEVICE = '<script>alert("d")</script>'
HOSTILE_CLIENT = "<img src=x onerror=alert(1)>"


async def test_event_fields_render_as_text(
    admin_client: tuple[aiohttp.ClientSession, str], console_server: ConsoleServer
) -> None:
    client, _ = admin_client
    conn = await asyncpg.connect(console_server.database_url)
    try:
        async with conn.transaction():
            await append_event(
                conn, instance="<b>gw</b>", type=EventType.CONNECT, outcome=Outcome.DENIED,
                reason=Reason.DEVICE_UNKNOWN, device_id=HOSTILE_DEVICE,
                peer_address='"><svg onload=alert(2)>:1',
                detail={"note": "</td></tr><script>alert(3)</script>"},
            )  # fmt: skip
            await conn.execute(
                "UPDATE auth_events SET client_id = $1 WHERE device_id = $2",
                HOSTILE_CLIENT,
                HOSTILE_DEVICE,
            )  # an edit of the chain: undone below, so chain tests still verify
        await _check_pages_escape(client)
    finally:
        await conn.execute(
            "UPDATE auth_events SET client_id = NULL WHERE device_id = $1", HOSTILE_DEVICE
        )
        await conn.close()


async def _check_pages_escape(client: aiohttp.ClientSession) -> None:
    pages = [
        "/console/events?outcome=denied&reason=device_unknown",
        "/console/events?device=" + "%3Cscript%3Ealert(%22d%22)%3C%2Fscript%3E",
        "/console/devices/" + "%3Cscript%3Ealert(%22d%22)%3C%2Fscript%3E",
    ]
    for path in pages:
        async with client.get(path) as response:
            assert response.status == 200, path
            text = await response.text()
        assert "&lt;script&gt;alert(&quot;d&quot;)&lt;/script&gt;" in text, path
        assert "<script>alert" not in text and "<img src=x" not in text, path
        assert "<svg onload" not in text and "<b>gw</b>" not in text, path
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), "inline script on " + path


async def test_security_headers_on_every_page(
    admin_client: tuple[aiohttp.ClientSession, str], anonymous: aiohttp.ClientSession
) -> None:
    client, _ = admin_client
    for path in ("/console/", "/console/events", "/console/chains", "/console/login",
                 "/console/devices/nope", "/console/static/console.js"):  # fmt: skip
        async with client.get(path) as response:
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert "frame-ancestors 'none'" in csp
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            if "/static/" not in path:
                assert response.headers["Cache-Control"] == "no-store"


def test_html_helpers_escape_by_default() -> None:
    from provisioning.console.html import Html, escape, join, tag

    assert tag("td", "<b>") == "<td>&lt;b&gt;</td>"
    assert tag("a", "x", href='"><script>') == '<a href="&quot;&gt;&lt;script&gt;">x</a>'
    assert Html("<p>") + "<b>" == "<p>&lt;b&gt;"
    assert "<b>" + Html("<p>") == "&lt;b&gt;<p>"
    assert isinstance(Html("<p>") + tag("i"), Html)
    assert join(["<", Html("<br>")]) == "&lt;<br>"
    assert escape(None) == ""


async def test_header_injection_in_next_is_not_followed(
    anonymous: aiohttp.ClientSession, console_key: str
) -> None:
    async with anonymous.get("/console/login") as response:
        token = csrf_of(await response.text())
    async with anonymous.post(
        "/console/login",
        data={"key": console_key, "csrf": token, "next": "/console/\r\nSet-Cookie: x=1"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303 and response.headers["Location"] == "/console/"


async def test_refused_certificate_column_is_text(
    admin_client: tuple[aiohttp.ClientSession, str], console_server: ConsoleServer
) -> None:
    """The certificate column names a refused certificate; its device-chosen names stay text."""
    client, _ = admin_client
    presented = describe_certificate(_hostile_certificate())
    conn = await asyncpg.connect(console_server.database_url)
    try:
        async with conn.transaction():
            await append_event(
                conn, instance=INSTANCE, type=EventType.TLS_HANDSHAKE, outcome=Outcome.DENIED,
                reason=Reason.UNKNOWN_ISSUER, cert_serial=presented.serial,
                cert_fingerprint=presented.fingerprint, tls_version="TLSv1.3",
                detail={"error": "self-signed certificate (18)", "verify_code": 18,
                        "presented": presented_detail(presented)},
            )  # fmt: skip
    finally:
        await conn.close()
    async with client.get("/console/events?reason=unknown_issuer&limit=500") as response:
        text = await response.text()
    cell = re.findall(r'<td class="certificate" data-label="certificate">([^<]*)</td>', text)[
        0
    ]  # newest first
    # RFC 4514 escapes < and > with a backslash; ESC is escaped as \x1b when recorded.
    name = r"CN=\&lt;script\&gt;alert(4)\&lt;/script\&gt;\x1b[2J"
    assert cell.startswith(f"presented {name} serial {presented.serial} sha256 ")
    assert f"sha256 {presented.fingerprint[:16]}.." in cell
    assert cell.endswith("(TLSv1.3): self-signed certificate (18)")
    assert "<script>alert(4)" not in text


def _hostile_certificate() -> bytes:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "<script>alert(4)</script>\x1b[2J")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)
