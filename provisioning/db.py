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


def _unavailable(url: str, exc: BaseException) -> DatabaseUnavailable:
    """One line: which URL (no password), what PostgreSQL said, and what to do."""
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        name = url.rsplit("/", 1)[-1].split("?")[0]
        fix = f"create it (createdb {name}), then run `devicegate db migrate`"
    elif isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        fix = "check the user and password in DEVICEGATE_DATABASE_URL"
    else:
        fix = "is PostgreSQL running there? Set DEVICEGATE_DATABASE_URL or --database-url"
    detail = str(exc) or type(exc).__name__
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {redact(url)}: {detail}; {fix}")


async def connect(url: str, *, connect_timeout: float = 10.0) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise _unavailable(url, exc) from exc


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, reset: Any = None
) -> asyncpg.Pool:
    """A pool; ``reset`` replaces asyncpg's per-release session reset (see asyncpg docs)."""
    try:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, timeout=10.0, reset=reset
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise _unavailable(url, exc) from exc
    assert pool is not None
    return pool
