"""Hardening fixtures: a provisioning listener of its own (a tight token-failure limit, so the
limit is reached in a few requests, and refusal summaries every second), clients that bind
other loopback source addresses, and the shared fixtures of the provisioning suite."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from datetime import timedelta

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from provisioning import admin
from provisioning.http import ratelimit
from schemas.settings import Settings
from tests.gateway.conftest import harness as harness  # gateway fixtures, re-exported
from tests.gateway.conftest import make_device as make_device
from tests.helpers import provisioning_server
from tests.provisioning.conftest import INSTANCE, Server
from tests.provisioning.conftest import admin_headers as admin_headers  # fixtures, re-exported
from tests.provisioning.conftest import client_context as client_context
from tests.provisioning.conftest import http as http
from tests.provisioning.conftest import published as published
from tests.provisioning.conftest import settings as settings

FAILURES = 5  # failed token attempts allowed per address in a burst
PER = 60.0  # ... earned back over this many seconds
SUMMARY = 1.0  # refusals beyond the audit budget are summarised every second
IN_FLIGHT = 8  # guarded requests one address may have running at once
BUDGET: int = Settings.model_fields["refusal_events_per_minute"].default  # refusals in full


@pytest.fixture(scope="session")
def admin_key(database_url: str) -> str:
    """An admin key of this suite's own (key names are unique in the shared database)."""

    async def create() -> str:
        conn = await asyncpg.connect(database_url)
        try:
            created = await admin.create_admin_key(
                conn, "hardening", actor="cli", instance=INSTANCE
            )
        finally:
            await conn.close()
        return created.key

    return asyncio.run(create())


@pytest.fixture(scope="session")
def limiter() -> ratelimit.TokenFailureLimiter:
    return ratelimit.TokenFailureLimiter(failures=FAILURES, per=PER, max_in_flight=IN_FLIGHT)


@pytest.fixture(scope="session")
def server(settings: Settings, limiter: ratelimit.TokenFailureLimiter) -> Iterator[Server]:
    """The production app (`build_app`: routes, middlewares, console, limiter) with the real
    TLS context on its own uvloop thread; only the limiter's numbers and the summary
    interval are tightened; the refusal budget is the default (the provisioning suite's
    settings turn it off)."""

    def tighten(app: web.Application) -> None:
        assert ratelimit.token_rate_limit in app.middlewares  # installed by build_app
        app[ratelimit.LIMITER] = limiter

    tight = settings.model_copy(
        update={
            "refusal_summary_interval": timedelta(seconds=SUMMARY),
            "refusal_events_per_minute": BUDGET,
        }
    )
    with provisioning_server(tight, configure=tighten) as port:
        yield Server(f"https://127.0.0.1:{port}", port)


_next_address = iter(range(2, 250))

SessionFactory = Callable[[], aiohttp.ClientSession]


@pytest.fixture
def from_address(client_context: ssl.SSLContext) -> Callable[[], tuple[str, SessionFactory]]:
    """``address, session = from_address()``: a fresh loopback source (127.0.0.2, .3, ...)
    and a factory of client sessions bound to it."""

    def make() -> tuple[str, SessionFactory]:
        address = f"127.0.0.{next(_next_address)}"

        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                ssl=client_context, force_close=True, local_addr=(address, 0)
            )
            return aiohttp.ClientSession(connector=connector)

        return address, session

    return make
