"""A factory behind one NAT address keeps connecting while bad handshakes come from it too.

250 good devices (certificates from the project's CA, CONNECT, CONNACK) and 600 bad
handshakes (no client certificate, or a self-signed one: a foreign CA) all from 127.0.0.1,
concurrently, against a real gateway with the default failure budget. Every good device
is admitted on its first attempt (no retry), and the real ``devicegate audit summary``
counts exactly 600 refused handshakes: the failures within the budget one event each, the
rest in summary events with their exact ``count``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.mqtt import Connect, encode
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from tests.conftest import _create_database, _drop_database
from tests.gateway.clients import client_context
from tests.gateway.conftest import TEST_POLICY, DeviceFactory, Harness, _pool
from tests.gateway.pg_sink import PgSink
from tests.gateway.served import DEVICEGATE

GOOD = 250
BAD = 600
FAILURES_PER_MINUTE = 30  # the documented default
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
R = TypeVar("R")


@pytest.fixture
def events_url() -> Iterator[str]:
    """A database of this test's own for the events: the CLI counts whole tables."""
    name = f"dg_test_nat_{datetime.now(UTC):%H%M%S%f}"
    url = asyncio.run(_create_database(name, migrated=True))
    yield url
    asyncio.run(_drop_database(name))


def _foreign_context(chain: Path, directory: Path) -> ssl.SSLContext:
    """A client presenting a self-signed certificate: an issuer the gateway never trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "foreign.crt", directory / "foreign.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(cafile=str(chain))
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


async def _good(port: int, context: ssl.SSLContext, client_id: str) -> bytes:
    """CONNECT on a fresh TLS connection; the first four bytes of the answer."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost", ssl_handshake_timeout=40
    )
    try:
        writer.write(encode(Connect(protocol_level=4, client_id=client_id), version=4))
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), 40)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _bad(port: int, context: ssl.SSLContext) -> str:
    """A handshake the gateway refuses; how it ended for the client."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost", ssl_handshake_timeout=40
        )
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    try:
        data = await asyncio.wait_for(reader.read(1), 40)  # TLS 1.3: the alert comes now
        return "eof" if not data else "data"
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _crowd(
    port: int, good: list[tuple[ssl.SSLContext, str]], bad: list[ssl.SSLContext]
) -> tuple[list[bytes | BaseException], list[str | BaseException]]:
    # Interleaved: a bad handshake goes first, then good and bad alternate (about 2.4 bad
    # per good), all in flight at once.
    jobs: list[asyncio.Task[bytes] | asyncio.Task[str]] = []
    goods: list[asyncio.Task[bytes]] = []
    bads: list[asyncio.Task[str]] = []
    pending = list(good)
    for i, context in enumerate(bad):
        bads.append(asyncio.create_task(_bad(port, context)))
        if pending and i % 2 == 1:
            context, client_id = pending.pop()
            goods.append(asyncio.create_task(_good(port, context, client_id)))
    for context, client_id in pending:
        goods.append(asyncio.create_task(_good(port, context, client_id)))
    jobs = [*goods, *bads]
    await asyncio.wait(jobs, timeout=50)
    return [_outcome(t) for t in goods], [_outcome(t) for t in bads]


def _outcome(task: asyncio.Task[R]) -> R | BaseException:
    if not task.done():
        task.cancel()
        return TimeoutError("still running after 50 s")
    return task.exception() or task.result()


def test_good_devices_behind_one_address_connect_through_a_flood_of_bad_handshakes(
    harness: Harness, make_device: DeviceFactory, events_url: str, tmp_path: Path
) -> None:
    devices = [make_device(f"line{i}") for i in range(GOOD)]
    good = [(client_context(d, harness.pki.chain), d.device_id) for d in devices]
    anonymous = ssl.create_default_context(cafile=str(harness.pki.chain))
    foreign = _foreign_context(harness.pki.chain, tmp_path)
    bad = [anonymous if i % 2 else foreign for i in range(BAD)]
    pool = harness.call(_pool(events_url))
    sink = PgSink(pool, "nat-gw/w0")
    gateway = Gateway(
        config=harness.config(handshake_timeout=10.0, connect_timeout=10.0),
        sink=sink,
        directory=PostgresDirectory(harness.pool),
        host="127.0.0.1",
        port=0,
        policy=TEST_POLICY,
        failed_handshakes_per_minute=FAILURES_PER_MINUTE,
        refusal_event_interval=1.0,
    )
    harness.call(gateway.start())
    try:
        goods, bads = asyncio.run(_crowd(gateway.port, good, bad))
    finally:
        harness.call(gateway.close(), timeout=30)  # flushes the summaries of open windows
        harness.call(pool.close())
    # Every good device in, on its first attempt.
    refused = [
        (d.device_id, r) for d, r in zip(devices, goods, strict=True) if r != CONNACK_ACCEPTED
    ]
    assert not refused, (len(refused), refused[:5])
    assert all(isinstance(r, str) for r in bads), [r for r in bads if not isinstance(r, str)][:5]

    command = [DEVICEGATE, "--database-url", events_url, "audit", "summary", "--since", "1h"]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    denied = {r["reason"]: r["count"] for r in summary["by_reason"] if r["outcome"] == "denied"}
    assert sum(denied.values()) == BAD, denied
    assert set(denied) <= {"no_client_certificate", "unknown_issuer", "rate_limited"}, denied
    assert summary["top_denied_peers"] == [{"peer_host": "127.0.0.1", "count": BAD}]
    text = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    assert f"denied {BAD}" in text, text
