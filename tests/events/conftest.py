"""Fixtures of the event log suite: a scratch database per test, events, a sink factory."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from schemas.events import AuthEvent, EventType, Outcome, Reason
from tests.conftest import _create_database, _drop_database
from tests.events.proxy import Proxy


@pytest.fixture
def scratch_url() -> Iterator[str]:
    """A migrated database of this test's own (the verifier and CLI see whole tables)."""
    name = f"dg_test_ev_{secrets.token_hex(4)}"
    url = asyncio.run(_create_database(name, migrated=True))
    yield url
    asyncio.run(_drop_database(name))


@pytest.fixture
async def scratch_db(scratch_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(scratch_url)
    yield connection
    await connection.close()


def make_event(index: int = 0, **overrides: Any) -> AuthEvent:
    """A realistic connect event; ``overrides`` replace fields."""
    values: dict[str, Any] = {
        "instance": "gw-test",
        "type": EventType.CONNECT,
        "outcome": Outcome.ALLOWED,
        "reason": Reason.OK,
        "device_id": f"dev-{index:05d}",
        "fleet": "line-a",
        "cert_serial": f"{index:x}",
        "cert_fingerprint": "ab" * 32,
        "client_id": f"dev-{index:05d}",
        "peer_address": f"10.0.{index % 250}.7:{40000 + index % 1000}",
        "tls_version": "TLSv1.3",
        "tls_cipher": "TLS_AES_128_GCM_SHA256",
        "detail": {"n": index, "note": "süd"},
    }
    values.update(overrides)
    return AuthEvent(**values)


@pytest.fixture
def events() -> Callable[..., AuthEvent]:
    return make_event


@pytest.fixture
async def proxy_to() -> AsyncIterator[Callable[[str], Any]]:
    """``proxied(url)``: the same database reached through a cuttable `Proxy`."""
    proxies: list[Proxy] = []

    async def proxied(url: str) -> tuple[Proxy, str]:
        parts = urlsplit(url)
        proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        await proxy.start()
        proxies.append(proxy)
        netloc = (
            f"{parts.username}@127.0.0.1:{proxy.port}"
            if parts.username
            else f"127.0.0.1:{proxy.port}"
        )
        return proxy, urlunsplit(parts._replace(netloc=netloc))

    yield proxied
    for proxy in proxies:
        await proxy.close()


def spool(tmp_path: Path, name: str = "w0") -> Path:
    return tmp_path / "spool" / name
