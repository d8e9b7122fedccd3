"""Gateway fixtures: a gateway in a background thread over real PostgreSQL and Mosquitto,
and devices with certificates from the project's CA, registered in the database."""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import BridgeConfig
from gateway.revocation import PostgresDirectory
from gateway.server import Gateway
from gateway.tls import server_context
from gateway.upstream import UpstreamTarget
from provisioning.agent.device import key_pem
from provisioning.pki.ca import (
    CertificateAuthority,
    DeviceIdentity,
    SignOptions,
    fingerprint,
    to_pem,
)
from schemas.policy import FleetPolicy, PolicyDocument
from tests.conftest import Pki
from tests.gateway.pg_sink import PgSink
from tests.gateway.served import ServeGateway, serve_gateway

T = TypeVar("T")
TRUST_DOMAIN = "devicegate.local"
INSTANCE = "test-gw"

TEST_POLICY = PolicyDocument(
    fleets={
        "bench": FleetPolicy(client_ids=("{device_id}-*",)),
        "lenient": FleetPolicy(drop_denied_publish_v3=True),
        "wide": FleetPolicy(subscribe=("devices/+/status", "fleets/{fleet}/#")),
    }
)


async def _pool(url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=1, max_size=4)


class Harness:
    """A gateway running on its own uvloop thread, with helpers to query its database."""

    policy: PolicyDocument = TEST_POLICY  # a suite with other needs overrides it

    def __init__(self, pki: Pki, database_url: str, mosquitto_port: int) -> None:
        self.pki = pki
        self.database_url = database_url
        self.mosquitto_port = mosquitto_port
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool: asyncpg.Pool = self.call(_pool(database_url))
        self.sink = PgSink(self.pool, f"{INSTANCE}/{secrets.token_hex(3)}")
        self.gateway = self.start_gateway()
        self.port = self.gateway.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def config(self, **changes: Any) -> BridgeConfig:
        values: dict[str, Any] = {
            "instance": INSTANCE,
            "trust_domain": TRUST_DOMAIN,
            "ssl_context": server_context(
                self.pki.chain, self.pki.server_cert, self.pki.server_key
            ),
            "upstream": UpstreamTarget("127.0.0.1", self.mosquitto_port),
            "handshake_timeout": 1.5,
            "connect_timeout": 1.5,
            "max_packet_size": 64 * 1024,
        }
        values.update(changes)
        return BridgeConfig(**values)

    def start_gateway(
        self, *, directory: Any = None, max_connections: int = 10_000, **changes: Any
    ) -> Gateway:
        gateway = Gateway(
            config=self.config(**changes),
            sink=self.sink,
            directory=directory or PostgresDirectory(self.pool),
            host="127.0.0.1",
            port=0,
            policy=self.policy,
            max_connections=max_connections,
        )
        self.call(gateway.start())
        return gateway

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return self.call(self.pool.fetch(sql, *args))

    def execute(self, sql: str, *args: Any) -> None:
        self.call(self.pool.execute(sql, *args))

    def mark(self) -> int:
        """The sequence number of the last event recorded so far."""
        return self.sink.seq

    def events(self, after: int = 0, **where: Any) -> list[asyncpg.Record]:
        clauses = [f"{key} = ${i}" for i, key in enumerate(where, 2)]
        sql = " AND ".join(["chain_id = $1", f"seq > {int(after)}", *clauses])
        return self.query(
            f"SELECT * FROM auth_events WHERE {sql} ORDER BY seq",
            self.sink.chain_id,
            *where.values(),
        )

    def wait_events(
        self, count: int = 1, timeout: float = 5.0, after: int = 0, **where: Any
    ) -> list[asyncpg.Record]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.events(after, **where)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def close(self) -> None:
        self.call(self.gateway.close())
        self.call(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def harness(pki: Pki, database_url: str, mosquitto_port: int) -> Iterator[Harness]:
    h = Harness(pki, database_url, mosquitto_port)
    yield h
    h.close()


@dataclass(frozen=True)
class Device:
    """A device's files and registry facts."""

    device_id: str
    fleet: str
    cert: Path
    key: Path
    chain: Path
    serial: str
    fingerprint: str


DeviceFactory = Callable[..., Device]


def issue(
    ca: CertificateAuthority,
    directory: Path,
    device_id: str,
    fleet: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> tuple[Path, Path, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    options = SignOptions(
        not_before=not_before or now - timedelta(minutes=5),
        not_after=not_after or now + timedelta(days=1),
    )
    cert = ca.issue_device_certificate(
        key.public_key(), DeviceIdentity(device_id, fleet, TRUST_DOMAIN), options
    )
    cert_path = directory / f"{device_id}-{secrets.token_hex(2)}.crt"
    key_path = cert_path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert


def hand_made(
    pki: Pki, directory: Path, common_name: str, spiffe_id: str, *extensions: x509.ExtensionType
) -> tuple[Path, Path, x509.Certificate]:
    """Files of a certificate our issuing CA signs with exactly these names and extensions,
    not through the device template: for certificates the service would never issue."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(pki.ca.issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = pki.ca.signer.sign_certificate(builder)
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    cert_path.write_text(to_pem(cert))
    key_path.write_bytes(key_pem(key))
    return cert_path, key_path, cert


@pytest.fixture
def make_device(harness: Harness, pki: Pki, tmp_path: Path) -> DeviceFactory:
    """``make_device(name, fleet=..., status=..., cert_status=..., ca=..., register=...)``."""

    def make(
        name: str = "dev",
        *,
        fleet: str = "plant",
        status: str = "active",
        cert_status: str = "active",
        ca: CertificateAuthority | None = None,
        register: bool = True,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        device_id: str | None = None,
    ) -> Device:
        device_id = device_id or f"{name}-{secrets.token_hex(4)}"
        cert_path, key_path, cert = issue(
            ca or pki.ca, tmp_path, device_id, fleet, not_before=not_before, not_after=not_after
        )
        serial = format(cert.serial_number, "x")
        fp = fingerprint(cert)
        if register:
            harness.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet)
            harness.execute(
                "INSERT INTO devices (device_id, fleet, status) VALUES ($1, $2, $3)"
                " ON CONFLICT (device_id) DO NOTHING",
                device_id,
                fleet,
                status,
            )
            harness.execute(
                "INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before,"
                " not_after, status, key_type, pem, revoked_at) VALUES ($1, $2, $3, $4, $5, $6,"
                " $7, $8, CASE WHEN $6 = 'revoked' THEN now() END)",
                serial,
                device_id,
                fp,
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
                cert_status,
                "ec-p256",
                cert_path.read_text(),
            )
        return Device(device_id, fleet, cert_path, key_path, pki.chain, serial, fp)

    return make


@pytest.fixture
def serve(pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path) -> ServeGateway:
    """``devicegate serve gateway`` as a child process (`serve_gateway`), on this test's PKI,
    database, upstream Mosquitto and ``tmp_path``; other arguments as ``serve_gateway``'s."""
    return functools.partial(
        serve_gateway,
        pki=pki,
        database_url=database_url,
        upstream_port=mosquitto_port,
        directory=tmp_path,
    )
