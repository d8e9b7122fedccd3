"""What every command shares: settings from the global options, running async code, output."""

from __future__ import annotations

import json
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.errors import DevicegateError
from schemas.settings import ConfigError, Settings, load_settings

T = TypeVar("T")

console = Console()
errors = Console(stderr=True)


@dataclass
class Context:
    """Global options, turned into `Settings` on first use."""

    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, **flags: Any) -> Settings:
        """The settings, with this command's own flags (``None`` = not given) on top."""
        try:
            return load_settings(self.config, **{**self.overrides, **flags})
        except ConfigError as exc:
            fail(str(exc), code=2)


def context(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj


def fail(message: str, code: int = 1) -> NoReturn:
    # The message is plain text: "[a-z0-9]" in it is no markup to interpret.
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def not_available(name: str) -> NoReturn:
    errors.print(f"devicegate {name}: not available yet")
    raise typer.Exit(2)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop; devicegate's typed errors become one clear line and exit status 1."""
    import uvloop

    try:
        return uvloop.run(coroutine)
    except DevicegateError as exc:
        fail(str(exc))


def print_json_lines(records: list[dict[str, Any]]) -> None:
    """One JSON object per line, as ``--json`` promises."""
    for record in records:
        sys.stdout.write(json.dumps(record, default=str, sort_keys=True) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    console.print(table)
