"""Provisioning fixtures: the real HTTPS listener (in a thread of its own), admin keys,
tokens, and device-side helpers that talk to it the way devices do.

The session's CA (``pki``) signs with its key file; a test decorated with `both_signers`
runs once with it and once with a CA whose keys are in a SoftHSM2 token (``pkcs11``), with
its own listener (every session fixture over ``pki`` is made once per signer).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from provisioning import admin
from provisioning.agent.device import KeyType, csr_pem, generate_key
from provisioning.pki.directory import init_pki, load_ca
from schemas.api import TokenCreateRequest
from schemas.settings import CRL_PATH, Settings
from tests.conftest import PASSPHRASE, Pki
from tests.helpers import provisioning_server
from tests.provisioning.hsm import SIGNERS, Hsm, make_hsm

INSTANCE = "test-provisioning"

Test = Callable[..., Any]


def both_signers(test: Test) -> Test:
    """Run ``test`` with the file signer and with the PKCS#11 one (SoftHSM2)."""
    test.signers = SIGNERS  # type: ignore[attr-defined]
    return test


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pki" in metafunc.fixturenames:
        signers = getattr(metafunc.function, "signers", ("file",))
        metafunc.parametrize("pki", signers, indirect=True, scope="session")


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Hsm:
    """This test process's SoftHSM2 token directory (SOFTHSM2_CONF is set for it)."""
    made = make_hsm(tmp_path_factory.mktemp("softhsm"))
    if made is None:
        pytest.skip("SoftHSM2 is not installed (scripts/ensure-services.sh installs it)")
    return made


@pytest.fixture(scope="session")
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's CA, signing with a key file (``file``) or a SoftHSM2 token (``pkcs11``)."""
    signer = getattr(request, "param", "file")
    directory = tmp_path_factory.mktemp(f"pki-{signer}")
    if signer == "file":
        init_pki(directory, passphrase=PASSPHRASE, force=True)
        return Pki(directory, PASSPHRASE, load_ca(directory, PASSPHRASE))
    hsm: Hsm = request.getfixturevalue("hsm")
    init_pki(directory, passphrase=None, token=hsm.new_token())
    return Pki(directory, PASSPHRASE, load_ca(directory, None))


@pytest.fixture(scope="session")
def settings(database_url: str, pki: Pki) -> Settings:
    return Settings(
        database_url=database_url,
        pki_dir=pki.directory,
        ca_passphrase=pki.passphrase.decode(),
        instance_id=INSTANCE,
        # These suites check the event of each refusal, many from 127.0.0.1: no audit
        # budget. The budget itself is tested in tests/hardening (its default).
        refusal_events_per_minute=1_000_000,
    )


@pytest.fixture
def env(settings: Settings, pki: Pki) -> dict[str, str]:
    """The environment of a ``devicegate`` command run against the session's database."""
    return {
        "DEVICEGATE_DATABASE_URL": settings.database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_CA_PASSPHRASE": pki.passphrase.decode(),
        "DEVICEGATE_INSTANCE_ID": "cli-test",
        "COLUMNS": "250",
    }


@dataclass(frozen=True)
class Server:
    url: str
    port: int


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[Server]:
    """The provisioning app with the real TLS context (see `provisioning_server`)."""
    with provisioning_server(settings) as port:
        yield Server(f"https://127.0.0.1:{port}", port)


@dataclass(frozen=True)
class Published:
    """A provisioning listener whose certificates name its own CRL, as `ca init` makes them."""

    server: Server
    pki: Pki
    settings: Settings
    crl_url: str


@pytest.fixture(scope="session")
def published(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """A PKI whose server certificate names ``https://127.0.0.1:<port>/v1/crl``, and the
    provisioning service on that port with ``public_url`` set, so device certificates do too.
    The socket is bound first: the port must be known before the PKI is made."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    public_url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    directory = tmp_path_factory.mktemp("pki-published")
    init_pki(directory, passphrase=PASSPHRASE, crl_url=public_url + CRL_PATH, force=True)
    settings = Settings(
        database_url=database_url,
        pki_dir=directory,
        ca_passphrase=PASSPHRASE.decode(),
        instance_id=INSTANCE,
        public_url=public_url,
    )
    assert settings.crl_url is not None
    pki = Pki(directory, PASSPHRASE, load_ca(directory, PASSPHRASE))
    with sock, provisioning_server(settings, sock=sock) as port:
        yield Published(Server(f"https://127.0.0.1:{port}", port), pki, settings, settings.crl_url)


@pytest.fixture(scope="session")
def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.chain))


def device_context(pki: Pki, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.chain))
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
async def http(client_context: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture(scope="session")
def admin_key(database_url: str) -> str:
    async def create() -> str:
        conn = await asyncpg.connect(database_url)
        try:
            created = await admin.create_admin_key(conn, "tests", actor="cli", instance=INSTANCE)
        finally:
            await conn.close()
        return created.key

    return asyncio.run(create())


@pytest.fixture
def admin_headers(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key}"}


_fleets = iter(range(1_000_000))


def new_fleet(prefix: str = "f") -> str:
    return f"{prefix}{next(_fleets)}-{secrets.token_hex(3)}"


async def make_token(
    conn: asyncpg.Connection,
    *,
    fleet: str | None = None,
    uses: int = 1,
    ttl: str = "8h",
    allow_reenroll: bool = False,
) -> tuple[str, str]:
    """(secret, token id) of a new token."""
    created = await admin.create_token(
        conn,
        TokenCreateRequest(
            fleet=fleet or new_fleet(), uses=uses, ttl=ttl, allow_reenroll=allow_reenroll
        ),
        actor="cli",
        instance=INSTANCE,
    )
    return created.token, str(created.id)


_CSR_CACHE: dict[KeyType, str] = {}


def some_csr(key_type: KeyType = KeyType.P256) -> str:
    """A valid CSR (cached: the service assigns identity, so one CSR may enroll many)."""
    if key_type not in _CSR_CACHE:
        _CSR_CACHE[key_type] = csr_pem(generate_key(key_type))
    return _CSR_CACHE[key_type]


async def uses_left(conn: asyncpg.Connection, token_id: str) -> int:
    value: int = await conn.fetchval(
        "SELECT uses_left FROM bootstrap_tokens WHERE id = $1", uuid.UUID(token_id)
    )
    return value


async def last_event(conn: asyncpg.Connection, **where: Any) -> asyncpg.Record:
    clauses = " AND ".join(f"{key} = ${i}" for i, key in enumerate(where, start=1))
    return await conn.fetchrow(
        f"SELECT * FROM auth_events WHERE {clauses} ORDER BY time DESC, id DESC LIMIT 1",
        *where.values(),
    )
