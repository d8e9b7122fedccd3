"""What the gateway counts as "PostgreSQL is unavailable": retry later, never crash."""

from __future__ import annotations

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
