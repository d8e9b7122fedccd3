"""Provisioning under abuse, against the real HTTPS listener and real PostgreSQL.

Token guessing (rate limited per address, audited within the refusal budget), token replay,
oversized and deeply nested bodies, CSRs that ask for more than a device gets, and clients
that do not speak TLS. Each test states the property it holds the service to.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import math
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.http.ratelimit import TokenFailureLimiter, address_key
from tests.conftest import Pki
from tests.hardening.conftest import BUDGET, FAILURES, IN_FLIGHT, PER, SUMMARY, SessionFactory
from tests.provisioning.conftest import Server, make_token, new_fleet, some_csr

FromAddress = Callable[[], tuple[str, SessionFactory]]


def bogus_token() -> str:
    return "dgt_" + secrets.token_urlsafe(32)


async def enroll(
    session: aiohttp.ClientSession, server: Server, token: str, csr: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"token": token, "csr": csr or some_csr()}
    async with session.post(f"{server.url}/v1/enroll", json=body) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def est_enroll(
    session: aiohttp.ClientSession, server: Server, token: str, csr_der_b64: bytes
) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/pkcs10"}
    async with session.post(
        f"{server.url}/.well-known/est/simpleenroll", data=csr_der_b64, headers=headers
    ) as response:
        return response.status, await response.read(), dict(response.headers)


def der_b64(csr_pem: str) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


async def events(db: asyncpg.Connection, peer: str, reason: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM auth_events WHERE type = 'enroll' AND outcome = 'denied' "
        "AND peer_address = $1 AND reason = $2 ORDER BY time, id",
        peer,
        reason,
    )


def counted(rows: list[asyncpg.Record]) -> int:
    """Refusals the rows account for: one per event, ``detail.count`` per summary."""
    return sum(json.loads(row["detail"]).get("count", 1) for row in rows)


async def refusals(
    db: asyncpg.Connection, peer: str, reason: str, expected: int
) -> list[asyncpg.Record]:
    """The rows of ``reason`` from ``peer``, once they account for ``expected`` refusals (the
    summaries come with the sweeper) or a few summary intervals have passed."""
    deadline = time.monotonic() + 4 * SUMMARY + 2
    while counted(rows := await events(db, peer, reason)) < expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    return rows


# --- token guessing ------------------------------------------------------------------------


async def test_token_guessing_is_rate_limited_per_address(
    server: Server, db: asyncpg.Connection, from_address: FromAddress
) -> None:
    guesser, guesser_session = from_address()
    other, other_session = from_address()
    fleet = new_fleet("rl")
    good, _ = await make_token(db, fleet=fleet, uses=2)

    started = time.monotonic()
    async with guesser_session() as session:
        for _ in range(FAILURES):
            status, problem, _ = await enroll(session, server, bogus_token())
            assert (status, problem["reason"]) == (401, "token_invalid")
        refused = 0
        flood_started = time.monotonic()
        for _ in range(20):
            status, problem, headers = await enroll(session, server, bogus_token())
            assert (status, problem["reason"]) == (429, "rate_limited"), problem
            assert problem["status"] == 429 and problem["title"]
            assert 1 <= int(headers["Retry-After"]) <= PER / FAILURES
            refused += 1
        # The address is blocked for good tokens too, and on the EST route (same bucket).
        status, problem, _ = await enroll(session, server, good)
        assert (status, problem["reason"]) == (429, "rate_limited")
        status, body, headers = await est_enroll(session, server, good, der_b64(some_csr()))
        assert status == 429 and b"rate_limited" in body and "Retry-After" in headers
        refused += 2

    # Another address is untouched: its guesses are plain refusals, its good token works.
    async with other_session() as session:
        status, problem, _ = await enroll(session, server, bogus_token())
        assert (status, problem["reason"]) == (401, "token_invalid")
        status, bundle, _ = await enroll(session, server, good)
        assert status == 201, bundle

    # Every failed guess is one event (within the route's refusal budget); the 429s go
    # through the same budget: recorded in full up to it, then summarised, none lost.
    assert len(await events(db, guesser, "token_invalid")) == FAILURES
    limited = await refusals(db, guesser, "rate_limited", refused)
    assert counted(limited) == refused
    budget = BUDGET
    intervals = math.ceil((time.monotonic() - flood_started) / SUMMARY)
    full = [json.loads(row["detail"]) for row in limited if "summary" not in row["detail"]]
    summaries = [json.loads(row["detail"]) for row in limited if "summary" in row["detail"]]
    # Full events: what the /v1/enroll budget had left after the 401s (and earned back while
    # the test ran), and the one EST 429.
    earned = math.ceil((time.monotonic() - started) * budget / 60)
    assert budget - FAILURES + 1 <= len(full) <= budget - FAILURES + 1 + earned, full
    assert {d["path"] for d in full} == {"/v1/enroll", "/.well-known/est/simpleenroll"}
    assert 1 <= len(summaries) <= intervals + 1, summaries
    assert {(d["method"], d["path"], d["address"]) for d in summaries} == {
        ("POST", "/v1/enroll", guesser)
    }
    assert all(row["hash"] for row in limited)  # on the provisioning chain like any event
    assert len(await events(db, other, "rate_limited")) == 0


async def test_est_token_failures_count_and_exhausted_tokens_do_not(
    server: Server, db: asyncpg.Connection, from_address: FromAddress
) -> None:
    """Failed Basic/Bearer tokens on EST count; ``token_exhausted`` (a factory-line race on a
    real token) does not, so a line that runs a token dry is not locked out."""
    _, make_session = from_address()
    once, _ = await make_token(db, uses=1)
    csr = der_b64(some_csr())
    async with make_session() as session:
        assert (await est_enroll(session, server, once, csr))[0] == 200
        for _ in range(FAILURES + 3):
            status, body, _ = await est_enroll(session, server, once, csr)
            assert status == 401 and b"token_exhausted" in body
        for _ in range(FAILURES):
            status, body, _ = await est_enroll(session, server, bogus_token(), csr)
            assert status == 401 and b"token_invalid" in body
        status, body, headers = await est_enroll(session, server, bogus_token(), csr)
        assert status == 429 and b"rate_limited" in body
        assert int(headers["Retry-After"]) >= 1


async def test_concurrent_guesses_cannot_outrun_the_count(
    server: Server, db: asyncpg.Connection, from_address: FromAddress
) -> None:
    """At most IN_FLIGHT guesses are undecided at once and each is charged: 60 concurrent
    guesses get at most ``IN_FLIGHT + FAILURES`` token checks, the rest are refused
    without one, and the overdraft makes the address wait longer."""
    address, make_session = from_address()
    async with make_session() as session:
        results = await asyncio.gather(*(enroll(session, server, bogus_token()) for _ in range(60)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {401, 429}
    assert FAILURES <= statuses.count(401) <= IN_FLIGHT + FAILURES, statuses
    rows = await refusals(db, address, "token_invalid", statuses.count(401))
    assert counted(rows) == statuses.count(401)
    assert counted(await refusals(db, address, "rate_limited", 60)) == statuses.count(429)


def test_limiter_memory_is_bounded_and_idle_entries_expire() -> None:
    now = [0.0]
    limiter = TokenFailureLimiter(failures=3, per=30, max_addresses=500, clock=lambda: now[0])
    for i in range(10_000):
        address = str(ipaddress.IPv4Address(0x0A000000 + i))
        for _ in range(5):  # 3 failures, then 2 refusals
            if limiter.acquire(address) is None:
                limiter.release(address, failed=True)
        assert len(limiter) <= 500
    # Once the buckets are full again and nothing is in flight, the table empties.
    limiter.expire()
    assert len(limiter) == 500
    now[0] += 60
    limiter.expire()
    assert len(limiter) == 0


def test_limiter_bucket_in_flight_and_retry_after() -> None:
    now = [100.0]
    limiter = TokenFailureLimiter(failures=2, per=10, max_in_flight=3, clock=lambda: now[0])
    a = "192.0.2.1"
    # At most max_in_flight attempts from one address at once, good or bad.
    assert [limiter.acquire(a) for _ in range(4)] == [None, None, None, 1]
    limiter.release(a, failed=False)
    limiter.release(a, failed=True)  # 1 token left, 1 attempt in flight
    assert limiter.acquire(a) is None
    limiter.release(a, failed=True)
    limiter.release(a, failed=True)  # the burst overdraws: -1
    assert limiter.acquire(a) == 10  # two attempts to earn back, one every 5 s
    now[0] += 5
    assert limiter.acquire(a) == 5
    now[0] += 5
    assert limiter.acquire(a) is None
    limiter.release(a, failed=False)
    # IPv6 clients share their /64; v4-mapped addresses are their IPv4 address.
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"


# --- replay --------------------------------------------------------------------------------


async def test_single_use_token_replayed(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection
) -> None:
    fleet = new_fleet("replay")
    token, token_id = await make_token(db, fleet=fleet, uses=1)
    status, _, _ = await enroll(http, server, token)
    assert status == 201
    for attempt in (enroll(http, server, token), enroll(http, server, token, some_csr())):
        status, problem, _ = await attempt
        assert (status, problem["reason"]) == (401, "token_exhausted")
    status, body, _ = await est_enroll(http, server, token, der_b64(some_csr()))
    assert status == 401 and b"token_exhausted" in body
    assert await db.fetchval("SELECT count(*) FROM devices WHERE fleet = $1", fleet) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM certificates JOIN devices USING (device_id) WHERE fleet = $1",
            fleet,
        )
        == 1
    )
    replays = await db.fetchval(
        "SELECT count(*) FROM auth_events WHERE type = 'enroll' AND reason = 'token_exhausted' "
        "AND detail->>'token_id' = $1",
        token_id,
    )
    assert replays == 3


# --- bodies --------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_413(
    http: aiohttp.ClientSession,
    server: Server,
    admin_headers: dict[str, str],
    chunked: bool,
) -> None:
    big = b'{"token": "' + b"A" * (2 * 1024 * 1024) + b'", "csr": "x"}'

    async def chunks() -> Any:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    for path, headers in (("/v1/enroll", {}), ("/v1/tokens", admin_headers)):
        try:
            async with http.post(
                f"{server.url}{path}",
                data=chunks() if chunked else big,
                headers={**headers, "Content-Type": "application/json"},
            ) as response:
                problem = await response.json(content_type=None)
                assert (response.status, problem["reason"]) == (413, "body_too_large")
        except aiohttp.ClientOSError:
            # The server may answer and close before the client finished sending.
            pass
    await assert_still_serving(http, server)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"token": ' + b"[" * 30_000 + b"]" * 30_000 + b', "csr": "x"}',
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
    ids=["arrays", "arrays-in-a-field", "objects"],
)
async def test_deeply_nested_json_is_400(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict[str, str], body: bytes
) -> None:
    assert len(body) < 64 * 1024  # inside the body limit, so the parser does see it
    for path, headers in (("/v1/enroll", {}), ("/v1/tokens", admin_headers)):
        headers = {**headers, "Content-Type": "application/json"}
        async with http.post(f"{server.url}{path}", data=body, headers=headers) as response:
            problem = await response.json(content_type=None)
            assert (response.status, problem["reason"]) == (400, "request_invalid"), problem


async def test_100k_nested_arrays_never_reach_the_parser(
    http: aiohttp.ClientSession, server: Server
) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    async with http.post(
        f"{server.url}/v1/enroll", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        problem = await response.json(content_type=None)
        assert (response.status, problem["reason"]) == (413, "body_too_large")


# --- CSRs that ask for too much ------------------------------------------------------------


def greedy_csr(victim: str, victim_fleet: str) -> str:
    """A CSR asking to be a CA, another device, a server, and a code signer."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, victim),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, victim_fleet),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devicegate"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                    ExtendedKeyUsageOID.CODE_SIGNING,
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("gateway.devicegate.local"),
                    x509.UniformResourceIdentifier(
                        f"spiffe://devicegate.local/fleet/{victim_fleet}/device/{victim}"
                    ),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                    x509.RFC822Name("root@devicegate.local"),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def assert_assigned_identity(cert: x509.Certificate, device_id: str, fleet: str, pki: Pki) -> None:
    cert.verify_directly_issued_by(pki.ca.issuing)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign and not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [
        x509.UniformResourceIdentifier(
            f"spiffe://devicegate.local/fleet/{fleet}/device/{device_id}"
        )
    ]
    assert {ext.oid._name for ext in cert.extensions} == {
        "basicConstraints",
        "keyUsage",
        "extendedKeyUsage",
        "subjectAltName",
        "subjectKeyIdentifier",
        "authorityKeyIdentifier",
    }


async def test_csr_cannot_choose_ca_identity_or_usage(
    http: aiohttp.ClientSession, server: Server, db: asyncpg.Connection, pki: Pki
) -> None:
    victim_fleet = new_fleet("victim")
    victim_token, _ = await make_token(db, fleet=victim_fleet)
    status, victim, _ = await enroll(http, server, victim_token)
    assert status == 201

    fleet = new_fleet("greedy")
    token, _ = await make_token(db, fleet=fleet, uses=2)
    csr = greedy_csr(victim["device_id"], victim_fleet)

    status, bundle, _ = await enroll(http, server, token, csr)
    assert status == 201, bundle
    assert bundle["device_id"] != victim["device_id"] and bundle["fleet"] == fleet
    cert = x509.load_pem_x509_certificate(bundle["certificate"].encode())
    assert_assigned_identity(cert, bundle["device_id"], fleet, pki)

    # The same CSR over EST: same policy.
    status, body, _ = await est_enroll(http, server, token, der_b64(csr))
    assert status == 200
    from cryptography.hazmat.primitives.serialization import pkcs7

    (est_cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    device_id = est_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(device_id, str) and device_id.startswith(f"{fleet}-")
    assert_assigned_identity(est_cert, device_id, fleet, pki)
    assert (
        await db.fetchval("SELECT count(*) FROM devices WHERE device_id = $1", victim["device_id"])
        == 1
    )


# --- not TLS -------------------------------------------------------------------------------


def _raw_exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a plain TCP connection; what comes back before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return received


async def assert_still_serving(http: aiohttp.ClientSession, server: Server) -> None:
    async with http.get(f"{server.url}/healthz") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "payload",
    [
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a truncated, nonsensical ClientHello
        b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37,  # SSLv2-style hello
        secrets.token_bytes(4096),
        b"",
    ],
    ids=["http-get", "http-post", "bad-hello", "sslv2-hello", "random", "empty"],
)
async def test_plain_http_and_garbage_are_refused(
    http: aiohttp.ClientSession, server: Server, payload: bytes
) -> None:
    received = await asyncio.to_thread(_raw_exchange, server.port, payload)
    assert b"HTTP/" not in received  # no plaintext answer, at most a TLS alert
    await assert_still_serving(http, server)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_old_tls_versions_are_refused(
    http: aiohttp.ClientSession, server: Server, pki: Pki
) -> None:
    def handshake(version: ssl.TLSVersion) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(pki.chain))
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            try:
                with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                    return tls.version() or ""
            except (ssl.SSLError, ConnectionResetError):
                return "refused"

    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        assert await asyncio.to_thread(handshake, version) == "refused"
    assert await asyncio.to_thread(handshake, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    await assert_still_serving(http, server)


async def test_many_half_open_connections_do_not_stop_service(
    http: aiohttp.ClientSession, server: Server
) -> None:
    """Connections that never finish a handshake do not block others."""
    writers = []
    for _ in range(50):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x16\x03\x01")  # the start of a record, then silence
        writers.append(writer)
    try:
        await asyncio.wait_for(assert_still_serving(http, server), 5)
    finally:
        for writer in writers:
            writer.close()


# --- bytes PostgreSQL refuses --------------------------------------------------------------


async def test_nul_bytes_are_400_not_500(
    http: aiohttp.ClientSession,
    server: Server,
    db: asyncpg.Connection,
    admin_headers: dict[str, str],
) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000; such input is the client's error."""
    token, _ = await make_token(db)
    async with http.post(
        f"{server.url}/v1/enroll",
        json={"token": token, "csr": some_csr(), "hardware_id": "hw\x00x"},
    ) as response:
        problem = await response.json(content_type=None)
        assert (response.status, problem["reason"]) == (400, "request_invalid"), problem
    async with http.post(
        f"{server.url}/v1/tokens", json={"fleet": "nul", "note": "a\x00b"}, headers=admin_headers
    ) as response:
        problem = await response.json(content_type=None)
        assert (response.status, problem["reason"]) == (400, "request_invalid"), problem
    for path in (
        "/v1/tokens?fleet=%00",
        "/v1/devices?fleet=a%00",
        "/v1/certificates?device=%00",
        "/v1/events?peer=%00&reason=%00&device=%00",
        "/v1/devices/a%00b",
        "/v1/devices/a%00b/disable",
        "/v1/certificates/a%00b/revoke",
    ):
        method = "POST" if path.endswith(("disable", "revoke")) else "GET"
        async with http.request(method, f"{server.url}{path}", headers=admin_headers) as response:
            problem = await response.json(content_type=None)
            assert response.status in (400, 404), (path, problem)
    # The token was not spent by the refused request, and others still enroll.
    status, bundle, _ = await enroll(http, server, token)
    assert status == 201, bundle


async def test_absurd_times_in_event_queries_are_400(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict[str, str]
) -> None:
    for query in (
        "until=999999999999999999999999999999",
        "since=99999999999999999999d",
        "since=9999-12-31T23:59:59&until=-1d",
        "since=0001-01-01",
    ):
        async with http.get(f"{server.url}/v1/events?{query}", headers=admin_headers) as response:
            problem = await response.json(content_type=None)
            assert response.status in (200, 400), (query, problem)


@pytest.mark.parametrize("ttl", ["1e30", "inf", 1e300, "99999999999d", "900000000d"])
async def test_absurd_token_lifetimes_are_400(
    http: aiohttp.ClientSession, server: Server, admin_headers: dict[str, str], ttl: object
) -> None:
    body = {"fleet": "ttl", "ttl": ttl}
    async with http.post(f"{server.url}/v1/tokens", json=body, headers=admin_headers) as response:
        problem = await response.json(content_type=None)
        assert (response.status, problem["reason"]) == (400, "request_invalid"), problem
