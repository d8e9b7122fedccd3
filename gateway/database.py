"""What the gateway counts as "PostgreSQL is unavailable": retry later, never crash."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import asyncpg

DB_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # The server ended the connection in the middle of a transaction and the ROLLBACK
    # found the protocol still consuming the error ("cannot switch to state 15").
    asyncpg.InternalClientError,
)


async def keep_session(connection: asyncpg.Connection) -> None:
    """A pool ``reset`` for pools that only run single statements (no LISTEN, SET or locks).

    asyncpg still rolls back a stray transaction before calling it; what it skips is the
    default reset query (``UNLISTEN *; RESET ALL; ...``), a round trip on every release
    that such a pool does not need: the revocation cache's lookups release once each.
    """


async def close_quietly(
    task: asyncio.Task[None] | None,
    pool: asyncpg.Pool | asyncpg.Connection | None,
    *,
    grace: float,
) -> None:
    """Cancel a background task and close its pool (or connection), terminating one that
    will not close."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if pool is not None:
        try:
            async with asyncio.timeout(grace):
                await pool.close()
        except TimeoutError:
            pool.terminate()
