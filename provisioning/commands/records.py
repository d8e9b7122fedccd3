"""Helpers of the record commands (token, device, cert, admin-key): a database connection
for one operation, and printing models as a table or as ``--json`` lines."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from provisioning.commands.common import notice, print_json_lines, print_table, run
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


def report_count(shown: int, *, limit: int, more: bool, noun: str, narrow: str) -> None:
    """Say on stderr (pipes stay clean) when nothing matched or the list was cut at
    ``limit``, and how to see the rest."""
    if shown == 0:
        notice(f"no {noun} match")
    elif more:
        notice(
            f"showing the newest {limit} {noun}; more match: raise --limit or narrow with {narrow}"
        )


def show_limited(
    records: Sequence[BaseModel],
    *,
    limit: int,
    json_output: bool,
    title: str,
    columns: list[str],
    narrow: str,
) -> None:
    """`show` for a list fetched with ``limit + 1``: the extra row only tells that more
    match; it is not shown, and the cut is reported (`report_count`)."""
    show(records[:limit], json_output=json_output, title=title, columns=columns)
    report_count(
        min(len(records), limit), limit=limit, more=len(records) > limit, noun=title,
        narrow=narrow,
    )  # fmt: skip
