"""Console fixtures: a database of its own loaded with synthetic events, the real provisioning
TLS listener over it (on a thread of its own, as in tests/provisioning), an admin key, and
logged-in HTTP clients.

``DEVICEGATE_CONSOLE_TEST_EVENTS`` sets the synthetic load (default 100,000 events over the
last week; the 1,000,000 run is ``bench/console.py``).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest

from provisioning import admin
from schemas.settings import Settings
from tests.conftest import Pki, _create_database, _drop_database
from tests.console.synthetic import load
from tests.helpers import provisioning_server

INSTANCE = "console-test"
EVENTS = int(os.environ.get("DEVICEGATE_CONSOLE_TEST_EVENTS", "100000"))


@pytest.fixture(scope="session")
def console_db() -> Iterator[str]:
    """A migrated database with the synthetic load, dropped at the end."""
    name = f"dg_test_console_{secrets.token_hex(4)}"

    async def create() -> str:
        url = await _create_database(name, migrated=True)
        conn = await asyncpg.connect(url)
        try:
            await load(conn, events=EVENTS)
        finally:
            await conn.close()
        return url

    url = asyncio.run(create())
    yield url
    asyncio.run(_drop_database(name))


@pytest.fixture(scope="session")
def console_settings(console_db: str, pki: Pki) -> Settings:
    return Settings(
        database_url=console_db,
        pki_dir=pki.directory,
        ca_passphrase=pki.passphrase.decode(),
        instance_id=INSTANCE,
    )


@dataclass(frozen=True)
class ConsoleServer:
    url: str
    port: int
    database_url: str


@pytest.fixture(scope="session")
def console_server(console_settings: Settings) -> Iterator[ConsoleServer]:
    """The provisioning app (console included) with its real TLS context, on a uvloop thread."""
    with provisioning_server(console_settings) as port:
        yield ConsoleServer(f"https://127.0.0.1:{port}", port, console_settings.database_url)


@pytest.fixture(scope="session")
def console_key(console_db: str) -> str:
    """An admin key named ``security-team``."""

    async def create() -> str:
        conn = await asyncpg.connect(console_db)
        try:
            created = await admin.create_admin_key(
                conn, "security-team", actor="cli", instance=INSTANCE
            )
        finally:
            await conn.close()
        return created.key

    return asyncio.run(create())


@pytest.fixture(scope="session")
def tls_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.chain))


@pytest.fixture
async def anonymous(
    tls_context: ssl.SSLContext, console_server: ConsoleServer
) -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a session that does not follow redirects on its own."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    connector = aiohttp.TCPConnector(ssl=tls_context)
    async with aiohttp.ClientSession(
        base_url=console_server.url, connector=connector, cookie_jar=jar
    ) as session:
        yield session


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: str) -> str:
    found = CSRF.search(page)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def log_in(client: aiohttp.ClientSession, key: str) -> str:
    """Log ``client`` in with ``key``; returns the session's CSRF token."""
    async with client.get("/console/login") as response:
        token = csrf_of(await response.text())
    async with client.post(
        "/console/login",
        data={"key": key, "csrf": token, "next": "/console/"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303, await response.text()
    async with client.get("/console/events?limit=50") as response:
        assert response.status == 200
        return csrf_of(await response.text())


@pytest.fixture
async def admin_client(
    anonymous: aiohttp.ClientSession, console_key: str
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """(client, CSRF token) of a logged-in session."""
    token = await log_in(anonymous, console_key)
    yield anonymous, token


@asynccontextmanager
async def edited_event(database_url: str, chain_id: str) -> AsyncIterator[str]:
    """A recent event of ``chain_id`` with its client id changed in the database (an edit
    the chain's hashes expose), restored on exit; yields the event's id."""
    conn = await asyncpg.connect(database_url)
    try:
        victim = await conn.fetchrow(
            "SELECT id, client_id FROM auth_events WHERE chain_id = $1 "
            "AND time > now() - interval '30 minutes' ORDER BY seq DESC LIMIT 1 OFFSET 3",
            chain_id,
        )
        assert victim is not None, f"no recent event in {chain_id}"
        await conn.execute("UPDATE auth_events SET client_id = 'edited' WHERE id = $1", victim[0])
        try:
            yield str(victim[0])
        finally:
            await conn.execute(
                "UPDATE auth_events SET client_id = $2 WHERE id = $1", victim[0], victim[1]
            )
    finally:
        await conn.close()
