"""Opening PostgreSQL connections with errors an operator can act on."""

from __future__ import annotations

import re
from typing import Any

import asyncpg

from schemas.errors import DevicegateError


class DatabaseUnavailable(DevicegateError):
    """PostgreSQL could not be reached or refused the login."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


async def connect(url: str, *, connect_timeout: float = 10.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {redact(url)}: {exc}") from exc


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, reset: Any = None
) -> asyncpg.Pool:
    """A pool; ``reset`` replaces asyncpg's per-release session reset (see asyncpg docs)."""
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, timeout=10.0, reset=reset
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {redact(url)}: {exc}") from exc
    assert pool is not None
    return pool
