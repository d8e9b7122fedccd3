"""Fixtures over real components: a scratch PostgreSQL database, a real PKI, Mosquitto."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from provisioning.pki.ca import CertificateAuthority
from provisioning.pki.directory import init_pki, load_ca
from schemas.migrate import migrate
from tests.helpers import mosquitto

ADMIN_URL = os.environ.get(
    "DEVICEGATE_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PASSPHRASE = b"test-passphrase-not-secret"


def _db_url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


async def _create_database(name: str, *, migrated: bool) -> str:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _db_url(name)
    if migrated:
        connection = await asyncpg.connect(url)
        try:
            await migrate(connection)
        finally:
            await connection.close()
    return url


async def _drop_database(name: str) -> None:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database of this test session's own, dropped at the end."""
    name = f"dg_test_{secrets.token_hex(4)}"
    url = asyncio.run(_create_database(name, migrated=True))
    yield url
    asyncio.run(_drop_database(name))


@pytest.fixture
def empty_database() -> Iterator[tuple[str, str]]:
    """(name, url) of a new, empty database for one test."""
    name = f"dg_test_{secrets.token_hex(4)}"
    url = asyncio.run(_create_database(name, migrated=False))
    yield name, url
    asyncio.run(_drop_database(name))


@pytest.fixture
def forget_policies(database_url: str) -> Iterator[None]:
    """For tests that store policies in the session's shared database: delete them
    afterwards, or a gateway that a later test starts (policy source: the database) would
    judge its devices by them."""
    yield
    asyncio.run(_forget_policies(database_url))


async def _forget_policies(url: str) -> None:
    from provisioning.policies import delete_policy, policy_names

    connection = await asyncpg.connect(url)
    try:
        for name in await policy_names(connection):
            await delete_policy(connection, name, actor="tests", instance="tests")
        await connection.execute("DELETE FROM policy_attachments")
    finally:
        await connection.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@dataclass(frozen=True)
class Pki:
    directory: Path
    passphrase: bytes
    ca: CertificateAuthority

    @property
    def chain(self) -> Path:
        return self.directory / "chain.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A PKI made by the project's own CA code, shared by the session."""
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, passphrase=PASSPHRASE, force=True)
    return Pki(directory, PASSPHRASE, load_ca(directory, PASSPHRASE))


@pytest.fixture(scope="session")
def mosquitto_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A clean Mosquitto broker of the session's own, on a free port."""
    with mosquitto(tmp_path_factory.mktemp("mosquitto")) as port:
        yield port
