"""What went wrong, in one line that says what to do: the CLI's only exception handler.

`explain` maps an exception a command let out to an exit status and a message;
`provisioning.commands.root.RootGroup.invoke` prints it (the traceback only with
``--debug``). Typed errors (`DevicegateError`, `ConfigError`) already carry a message an
operator can act on; the rest are the few that escape from libraries: PostgreSQL on a
database that was never migrated, and a port another process holds.
"""

from __future__ import annotations

import errno
from typing import Any

MIGRATE = "run `devicegate db migrate`"

# asyncpg's names for "the schema is not there (yet)": a database that was never migrated
# or is older than this release.
_SCHEMA_MISSING = {
    "UndefinedTableError",
    "UndefinedColumnError",
    "UndefinedFunctionError",
    "UndefinedObjectError",
}


def _database(context: Any) -> str:
    from provisioning.db import redact

    settings = getattr(context, "loaded", None)
    return f"the database {redact(settings.database_url)}" if settings else "the database"


def _os_error(exc: OSError, context: Any) -> str:
    listen = getattr(context, "listen", None)
    if exc.errno == errno.EADDRINUSE:
        where = f" on {listen}" if listen else ""
        return (
            f"cannot listen{where}: the address is already in use by another process "
            "(stop it, or choose another address with --listen)"
        )
    if exc.errno in (errno.EACCES, errno.EADDRNOTAVAIL) and listen:
        return f"cannot listen on {listen}: {exc.strerror} (choose another address with --listen)"
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)


def explain(exc: Exception, context: Any) -> tuple[int, str]:
    """``(exit status, message)`` for an exception; ``context`` is the root `Context`."""
    from schemas.errors import DevicegateError
    from schemas.settings import ConfigError

    if isinstance(exc, ConfigError):
        return 2, str(exc)
    if isinstance(exc, DevicegateError):
        return 1, str(exc)
    if isinstance(exc, OSError):
        return 1, _os_error(exc, context)
    if type(exc).__module__.startswith("asyncpg"):
        if type(exc).__name__ in _SCHEMA_MISSING:
            return 1, f"{_database(context)} is not migrated ({exc}): {MIGRATE}"
        return 1, f"PostgreSQL refused the operation on {_database(context)}: {exc}"
    return 1, f"unexpected {type(exc).__name__}: {exc} (run again with --debug for the traceback)"
