from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg

from schemas.migrate import available, migrate, pending


async def _schema(url: str) -> list[tuple[str, str]]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2"
        )
        return [(row[0], row[1]) for row in rows]
    finally:
        await connection.close()


async def test_migrations_apply_to_an_empty_database_then_change_nothing(
    empty_database: tuple[str, str],
) -> None:
    _, url = empty_database
    connection = await asyncpg.connect(url)
    try:
        assert await pending(connection) == [m.version for m in available()]
        applied = await migrate(connection)
        assert applied == [m.version for m in available()]
        before = await _schema(url)
        assert await migrate(connection) == []
        assert await _schema(url) == before
        tables = {name for name, _ in before}
        for table in (
            "fleets",
            "bootstrap_tokens",
            "devices",
            "certificates",
            "auth_events",
            "schema_migrations",
            "event_chains",
            "admin_keys",
        ):
            assert table in tables
    finally:
        await connection.close()


async def test_auth_events_is_partitioned_by_month_with_partitions_ahead(
    empty_database: tuple[str, str],
) -> None:
    _, url = empty_database
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        partitions = await connection.fetch(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'auth_events'::regclass ORDER BY 1"
        )
        names = [row["relname"] for row in partitions]
        assert "auth_events_default" in names
        months = await connection.fetchval(
            "SELECT count(*) FROM generate_series(date_trunc('month', now()), "
            "date_trunc('month', now()) + interval '3 months', interval '1 month') AS m "
            "WHERE to_regclass('auth_events_' || to_char(m, 'YYYY_MM')) IS NOT NULL"
        )
        assert months == 4
        # Calling it again creates nothing; an event of this month lands in its partition.
        assert await connection.fetchval("SELECT devicegate_ensure_partitions()") == 0
        indexes = {
            row["indexdef"].split(" USING ")[1]
            for row in await connection.fetch(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'auth_events'"
            )
        }
        for columns in (
            '(device_id, "time" DESC)',
            '(reason, "time" DESC)',
            '(outcome, "time" DESC)',
        ):
            assert any(columns in index for index in indexes), (columns, indexes)
    finally:
        await connection.close()


async def test_a_default_partition_row_moves_when_its_month_is_created(
    empty_database: tuple[str, str],
) -> None:
    _, url = empty_database
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection)
        await connection.execute(
            "INSERT INTO auth_events (id, time, instance, type, outcome, reason, chain_id, seq,"
            " prev_hash, hash) VALUES (gen_random_uuid(), now() + interval '8 months', 'i',"
            " 'connect', 'allowed', 'ok', 'c', 1, 'p', 'h')"
        )
        assert await connection.fetchval("SELECT count(*) FROM auth_events_default") == 1
        await connection.fetchval("SELECT devicegate_ensure_partitions(0, 9)")
        assert await connection.fetchval("SELECT count(*) FROM auth_events_default") == 0
        assert await connection.fetchval("SELECT count(*) FROM auth_events") == 1
    finally:
        await connection.close()


def test_two_migrate_processes_at_once_both_succeed(empty_database: tuple[str, str]) -> None:
    _, url = empty_database
    env = {**os.environ, "DEVICEGATE_DATABASE_URL": url}
    command = [sys.executable, "-m", "provisioning.commands.cli", "db", "migrate"]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    stdout = "".join(out for out, _ in outputs)
    assert stdout.count(f"applied {len(available())} migration") == 1, stdout
    assert "up to date" in stdout

    async def count() -> int:
        connection = await asyncpg.connect(url)
        try:
            value: int = await connection.fetchval("SELECT count(*) FROM schema_migrations")
            return value
        finally:
            await connection.close()

    assert asyncio.run(count()) == len(available())
