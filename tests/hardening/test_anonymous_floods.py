"""Anonymous floods against the real provisioning listener and real PostgreSQL.

From one loopback address, 10,000 unauthenticated requests to each route a client reaches
before it is authenticated (renew and EST simplereenroll without a certificate, enroll and
EST simpleenroll with an invalid CSR or a wrong token, a console login with a wrong key).
Each is refused as before; the audit log grows by a bounded number of rows whose counts
add up to exactly 10,000; a real device enrolling from another address meanwhile gets its
certificate. The peer address the service sees is the TCP peer (`request.remote`), so the
flood binds 127.0.0.N and the device connects from 127.0.0.1.

The service is the real ``devicegate serve provisioning`` in a process of its own (so the
flooding client does not share its interpreter), with its default budget and summary
interval; a last test stops one with SIGTERM and finds every refusal counted. The two
routes beyond the issue's four (a wrong token, an EST CSR) take 2,000 requests: the same
mechanism, less time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cryptography import x509

from provisioning.agent import device
from schemas.settings import Settings
from tests.conftest import Pki
from tests.hardening.conftest import BUDGET
from tests.hardening.test_provisioning_abuse import bogus_token, der_b64
from tests.helpers import free_port, wait_for_port
from tests.provisioning.conftest import make_token, some_csr

REQUESTS = 10_000
CONNECTIONS = 32  # keep-alive connections of the flooding client
MAX_ROWS = 200
INTERVAL = Settings.model_fields["refusal_summary_interval"].default.total_seconds()
_addresses = iter(range(250, 200, -1))  # clear of from_address's 127.0.0.2, .3, ...

Send = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[int, str]]]


async def _problem(response: aiohttp.ClientResponse) -> tuple[int, str]:
    return response.status, (await response.json(content_type=None))["reason"]


async def renew_without_certificate(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(f"{url}/v1/renew", json={"csr": some_csr()}) as response:
        return await _problem(response)


async def enroll_invalid_csr(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    body = {"token": bogus_token(), "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"}
    async with session.post(f"{url}/v1/enroll", json=body) as response:
        return await _problem(response)


async def enroll_wrong_token(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    body = {"token": bogus_token(), "csr": some_csr()}
    async with session.post(f"{url}/v1/enroll", json=body) as response:
        return await _problem(response)


async def est_enroll_invalid_csr(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {bogus_token()}", "Content-Type": "application/pkcs10"}
    async with session.post(
        f"{url}/.well-known/est/simpleenroll", data=b"AAAA", headers=headers
    ) as response:
        return await _problem(response)


async def est_reenroll_without_certificate(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, str]:
    async with session.post(
        f"{url}/.well-known/est/simplereenroll",
        data=der_b64(some_csr()),
        headers={"Content-Type": "application/pkcs10"},
    ) as response:
        return await _problem(response)


async def console_login_wrong_key(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    # The login form's double-submit CSRF pair, sent by hand (the jar is off: each 401 page
    # sets a new cookie, which concurrent requests would race over).
    token = "t" * 43
    async with session.post(
        f"{url}/console/login",
        data={"key": "dgk_" + secrets.token_urlsafe(32), "csrf": token},
        headers={"Cookie": f"dg_console_login={token}"},
        allow_redirects=False,
    ) as response:
        await response.read()
        return response.status, "unauthorized" if response.status == 401 else "?"


@dataclass(frozen=True)
class Route:
    send: Send
    path: str
    refusals: frozenset[tuple[int, str]]  # (status, reason) each request may get
    requests: int = REQUESTS


ROUTES = {
    "renew-no-certificate": Route(
        renew_without_certificate, "/v1/renew", frozenset({(401, "no_client_certificate")})
    ),
    "enroll-invalid-csr": Route(
        enroll_invalid_csr, "/v1/enroll", frozenset({(400, "csr_invalid")})
    ),
    "enroll-wrong-token": Route(
        enroll_wrong_token,
        "/v1/enroll",
        frozenset({(401, "token_invalid"), (429, "rate_limited")}),
        2_000,
    ),
    "est-simpleenroll-invalid-csr": Route(
        est_enroll_invalid_csr,
        "/.well-known/est/simpleenroll",
        frozenset({(400, "csr_invalid")}),
        2_000,
    ),
    "est-simplereenroll-no-certificate": Route(
        est_reenroll_without_certificate,
        "/.well-known/est/simplereenroll",
        frozenset({(401, "no_client_certificate")}),
    ),
    "console-login-wrong-key": Route(
        console_login_wrong_key, "/console/login", frozenset({(401, "unauthorized")})
    ),
}


async def flood(
    address: str,
    context: ssl.SSLContext,
    url: str,
    send: Send,
    *,
    requests: int = REQUESTS,
    until: asyncio.Event | None = None,
) -> Counter[tuple[int, str]]:
    """``requests`` requests from ``address`` over ``CONNECTIONS`` keep-alive connections
    (with ``until``: and on until it is set, at most 10x as many); how many got each
    (status, reason)."""
    connector = aiohttp.TCPConnector(ssl=context, limit=CONNECTIONS, local_addr=(address, 0))
    seen: Counter[tuple[int, str]] = Counter()
    numbers = itertools.count()
    cap = requests if until is None else 10 * requests
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def worker() -> None:
            while (number := next(numbers)) < cap:
                if number >= requests and (until is None or until.is_set()):
                    return
                seen[await send(session, url)] += 1

        async with asyncio.TaskGroup() as group:
            for _ in range(CONNECTIONS):
                group.create_task(worker())
    return seen


@contextlib.contextmanager
def serve_provisioning(
    database_url: str, pki: Pki, *, interval: str, log: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``devicegate serve provisioning`` on ``port`` (the process), killed if still running;
    its stderr goes to ``log`` (never a pipe nobody reads: a full one stalls the service)."""
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_CA_PASSPHRASE": pki.passphrase.decode(),
        "DEVICEGATE_INSTANCE_ID": "flood-test",
        "DEVICEGATE_METRICS_LISTEN": "off",
        "DEVICEGATE_REFUSAL_SUMMARY_INTERVAL": interval,
    }
    port = free_port()
    devicegate = str(Path(sys.executable).with_name("devicegate"))
    with open(log or os.devnull, "w") as stderr:
        process = subprocess.Popen(
            [devicegate, "serve", "provisioning", "--listen", f"127.0.0.1:{port}"],
            env=env,
            stderr=stderr,
            text=True,
        )
    process.url = f"https://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        wait_for_port(port, timeout=20)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def served(database_url: str, pki: Pki) -> Iterator[str]:
    """The URL of a ``devicegate serve provisioning`` with the default interval."""
    with serve_provisioning(database_url, pki, interval=f"{INTERVAL:g}s") as process:
        yield process.url  # type: ignore[attr-defined]


async def rows_from(db: asyncpg.Connection, address: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT type, outcome, reason, detail, device_id FROM auth_events "
        "WHERE peer_address = $1 ORDER BY time, id",
        address,
    )


def accounted(rows: list[asyncpg.Record]) -> Counter[str]:
    """Refusals by reason: one per event, ``detail.count`` per summary."""
    total: Counter[str] = Counter()
    for row in rows:
        total[row["reason"]] += json.loads(row["detail"]).get("count", 1)
    return total


@pytest.mark.parametrize("name", list(ROUTES))
async def test_anonymous_flood_is_refused_bounded_and_counted(
    name: str,
    served: str,
    db: asyncpg.Connection,
    client_context: ssl.SSLContext,
    pki: Pki,
    tmp_path: Path,
) -> None:
    route = ROUTES[name]
    address = f"127.0.0.{next(_addresses)}"
    good, _ = await make_token(db, uses=1)
    rows_before = await db.fetchval("SELECT count(*) FROM auth_events")

    started = time.monotonic()
    enrolled = asyncio.Event()  # the flood goes on (bounded) until the device is in
    flooding = asyncio.create_task(
        flood(address, client_context, served, route.send, requests=route.requests, until=enrolled)
    )
    await asyncio.sleep(0.5)  # the flood is under way
    # A real device, from another address (127.0.0.1), enrolls meanwhile.
    bundle = await device.enroll(
        url=served, token=good, out_dir=tmp_path / "device", ca_cert=pki.chain
    )
    assert not flooding.done(), "the flood ended before the device enrolled"
    enrolled.set()
    seen = await flooding
    assert x509.load_pem_x509_certificate(bundle.certificate.encode()).subject

    # Every request was refused, as before (status and reason unchanged; 429 only where the
    # token limiter already said so).
    assert sum(seen.values()) >= route.requests
    assert set(seen) <= route.refusals, seen

    # Exact totals once the sweeper has written the summaries.
    expected = Counter({reason: n for (_, reason), n in seen.items()})
    deadline = time.monotonic() + 2 * INTERVAL + 5
    while accounted(rows := await rows_from(db, address)) != expected:
        assert time.monotonic() < deadline, (accounted(rows), expected)
        await asyncio.sleep(0.2)
    summaries = [json.loads(r["detail"]) for r in rows if "summary" in json.loads(r["detail"])]
    assert summaries and all(s["path"] == route.path and s["address"] == address for s in summaries)
    assert all(s["first"] <= s["last"] for s in summaries)
    assert all(r["outcome"] == "denied" for r in rows)

    # Bounded: at most the budget (plus what it earns back) in full, one summary per reason
    # per sweep; the whole table grew by at most MAX_ROWS (the device's event included).
    full = len(rows) - len(summaries)
    waited = time.monotonic() - started
    assert full <= BUDGET + BUDGET * waited / 60 + 1, full
    assert len(summaries) <= len(expected) * (waited / INTERVAL + 2), len(summaries)
    grown = await db.fetchval("SELECT count(*) FROM auth_events") - rows_before
    assert len(rows) < grown <= MAX_ROWS, (len(rows), grown)


async def test_counts_pending_at_shutdown_are_written(
    database_url: str, db: asyncpg.Connection, client_context: ssl.SSLContext, pki: Pki
) -> None:
    """With summaries due only hourly, SIGTERM still writes every count: none is lost."""
    address = f"127.0.0.{next(_addresses)}"
    with serve_provisioning(database_url, pki, interval="1h") as process:
        url: str = process.url  # type: ignore[attr-defined]
        seen = Counter[tuple[int, str]]()
        for send in (renew_without_certificate, console_login_wrong_key):
            seen += await flood(address, client_context, url, send, requests=300)
        assert seen == {(401, "no_client_certificate"): 300, (401, "unauthorized"): 300}
        before = accounted(await rows_from(db, address))
        assert before == {"no_client_certificate": BUDGET, "unauthorized": BUDGET}
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    rows = await rows_from(db, address)
    assert accounted(rows) == {"no_client_certificate": 300, "unauthorized": 300}
    assert len(rows) == 2 * BUDGET + 2  # one summary per route and reason
