"""Fixtures of the event log suite: a scratch database per test, events, a sink factory."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import subprocess
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


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path``: a filesystem that really runs out of
    space (ENOSPC). Skips the test when mounting is impossible (not root, no
    CAP_SYS_ADMIN, e.g. an unprivileged container)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a tiny filesystem for a real ENOSPC")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real ENOSPC: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10, check=False)


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Fill ``directory``'s filesystem with a filler file until ENOSPC, then give back
    ``leave`` bytes; returns the filler (delete it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    size = 0
    try:
        for _ in range(1 << 20):  # bounded: a tmpfs of at most 4 GiB
            try:
                size += os.write(fd, bytes(4096))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError(f"{directory} never ran out of space")
        os.ftruncate(fd, max(size - leave, 0))
    finally:
        os.close(fd)
    return filler
