"""Helpers of the record commands (token, device, cert, admin-key): a database connection
for one operation, and printing models as a table or as ``--json`` lines."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from provisioning.commands.common import print_json_lines, print_table, run
from provisioning.db import connect
from schemas.settings import Settings

T = TypeVar("T")

CLI_ACTOR = "cli"


def with_connection(settings: Settings, operation: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``operation(connection)`` on uvloop; typed errors exit 1 with one line."""

    async def _run() -> T:
        conn = await connect(settings.database_url)
        try:
            return await operation(conn)
        finally:
            await conn.close()

    return run(_run())


def show(
    records: Sequence[BaseModel],
    *,
    json_output: bool,
    title: str,
    columns: list[str],
) -> None:
    """Print models: JSON lines (every field) or a table of ``columns``."""
    dumped = [record.model_dump(mode="json") for record in records]
    if json_output:
        print_json_lines(dumped)
        return
    print_table(title, columns, [[row.get(column) for column in columns] for row in dumped])
