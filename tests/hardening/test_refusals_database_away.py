"""No refusal goes uncounted while the database is away (issue 20).

The real ``devicegate serve provisioning`` in a process of its own reaches PostgreSQL
through a TCP proxy (`tests.helpers.Proxy`) that the test cuts and restores: a PostgreSQL
restart or a partition, as the service sees it. One address floods routes beyond their
audit budget while the database is cut (so neither the refusals within the budget nor the
summaries can be written), then the database comes back. Once it is back, the audit log
accounts for every request sent, per reason: full rows plus the summed ``detail.count`` of
the summaries; with the sweeper's next pass, or at SIGTERM when the next pass is an hour
away.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.conftest import Pki
from tests.hardening.test_anonymous_floods import (
    _addresses,
    accounted,
    enroll_invalid_csr,
    est_reenroll_without_certificate,
    flood,
    renew_without_certificate,
    rows_from,
    serve_provisioning,
)
from tests.helpers import Proxy

REQUESTS = 300  # per route: beyond the default budget (refusal_events_per_minute)
SENDS = (renew_without_certificate, est_reenroll_without_certificate, enroll_invalid_csr)
"""Routes refused without the database (a console login needs it to check the key: 503)."""


class ThreadedProxy:
    """A `Proxy` on an event loop of its own thread: it relays while the test blocks (on
    ``serve_provisioning``'s wait for the port, or a process's exit)."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self.proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def cut(self) -> None:
        self._run(self.proxy.cut())

    async def restore(self) -> None:
        self._run(self.proxy.restore())

    def __enter__(self) -> ThreadedProxy:
        self._run(self.proxy.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def through(proxy: ThreadedProxy, database_url: str) -> str:
    """``database_url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(database_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (
        f"{credentials}@127.0.0.1:{proxy.proxy.port}"
        if credentials
        else f"127.0.0.1:{proxy.proxy.port}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


async def flood_while_cut(
    proxy: ThreadedProxy,
    db: asyncpg.Connection,
    address: str,
    context: ssl.SSLContext,
    url: str,
) -> Counter[str]:
    """Cut the database, flood two routes from ``address``, restore it; sent, per reason."""
    await proxy.cut()
    seen = Counter[tuple[int, str]]()
    for send in SENDS:
        seen += await flood(address, context, url, send, requests=REQUESTS)
    assert await rows_from(db, address) == []  # nothing could be written meanwhile
    await proxy.restore()
    # Refused as before, the database away or not.
    assert seen == {(401, "no_client_certificate"): 2 * REQUESTS, (400, "csr_invalid"): REQUESTS}
    return Counter({reason: n for (_, reason), n in seen.items()})


@contextlib.contextmanager
def served_through_proxy(
    database_url: str, pki: Pki, *, interval: str, log: Path
) -> Iterator[tuple[ThreadedProxy, str, subprocess.Popen[str]]]:
    """(proxy, URL, process) of a service whose database connections go through the proxy."""
    with (
        ThreadedProxy(database_url) as proxy,
        serve_provisioning(
            through(proxy, database_url), pki, interval=interval, log=log
        ) as process,
    ):
        yield proxy, process.url, process  # type: ignore[attr-defined]


async def test_refusals_counted_while_the_database_is_cut_are_all_written_after(
    database_url: str,
    db: asyncpg.Connection,
    client_context: ssl.SSLContext,
    pki: Pki,
    tmp_path: Path,
) -> None:
    address = f"127.0.0.{next(_addresses)}"
    log = tmp_path / "service.log"
    with served_through_proxy(database_url, pki, interval="1s", log=log) as (proxy, url, process):
        expected = await flood_while_cut(proxy, db, address, client_context, url)
        deadline = time.monotonic() + 30
        while accounted(rows := await rows_from(db, address)) != expected:
            assert time.monotonic() < deadline, (accounted(rows), expected)
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # two more sweeps: nothing written twice
        assert accounted(await rows_from(db, address)) == expected
        assert process.poll() is None


async def test_refusals_counted_while_the_database_was_cut_are_written_at_sigterm(
    database_url: str,
    db: asyncpg.Connection,
    client_context: ssl.SSLContext,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """With the next sweep an hour away, SIGTERM (the database back) writes them all."""
    address = f"127.0.0.{next(_addresses)}"
    log = tmp_path / "service.log"
    with served_through_proxy(database_url, pki, interval="1h", log=log) as (proxy, url, process):
        expected = await flood_while_cut(proxy, db, address, client_context, url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert accounted(await rows_from(db, address)) == expected
    assert "counted but not recorded" not in log.read_text()
