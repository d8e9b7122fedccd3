"""Applies the SQL files in ``schemas/sql`` in order, each once, each in its own transaction.

A session-level advisory lock serialises concurrent runners: the second waits, then finds
nothing left to do. Applied files are recorded in ``schema_migrations`` with a checksum, and
a file changed after it was applied is reported rather than silently skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import asyncpg

from schemas.errors import DevicegateError

_LOCK_KEY = 0x646576_6761_7465  # "devgate": any constant shared by every runner


class MigrationError(DevicegateError):
    """A migration could not be applied, or an applied one was edited afterwards."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The packaged migrations, ordered by file name (``NNNN_name.sql``)."""
    folder = resources.files("schemas") / "sql"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(entry.name.removesuffix(".sql"), entry.read_text()) for entry in files]


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Apply every pending migration; returns the versions applied by this call."""
    await connection.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await connection.fetch("SELECT version, checksum FROM schema_migrations")
        applied = {row["version"]: row["checksum"] for row in rows}
        done: list[str] = []
        for migration in available():
            recorded = applied.get(migration.version)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} was changed after it was applied"
                    )
                continue
            try:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                        migration.version,
                        migration.checksum,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {migration.version} failed: {exc}") from exc
            done.append(migration.version)
        return done
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def pending(connection: asyncpg.Connection) -> list[str]:
    """Versions not yet applied (all of them on an empty database)."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied: set[str] = set()
    if exists:
        rows = await connection.fetch("SELECT version FROM schema_migrations")
        applied = {row["version"] for row in rows}
    return [m.version for m in available() if m.version not in applied]
