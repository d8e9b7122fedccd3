"""What every command shares: settings from the global options, running async code, output.

Heavy modules (pydantic settings, uvloop, rich tables) are imported inside the functions
that need them: ``devicegate --help`` and the device side start without them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from schemas.settings import Settings

T = TypeVar("T")

console = Console()
errors = Console(stderr=True)


@dataclass
class Context:
    """Global options, turned into `Settings` on first use.

    ``loaded`` (the last settings built) and ``listen`` (the address a server command
    binds) let `provisioning.commands.failures` name the database or the port in a message.
    """

    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    loaded: Settings | None = None
    listen: str | None = None

    def settings(self, **flags: Any) -> Settings:
        """The settings, with this command's own flags (``None`` = not given) on top.

        A wrong value raises `ConfigError`, which the root prints as one line (exit 2).
        """
        from schemas.settings import load_settings

        self.loaded = load_settings(self.config, **{**self.overrides, **flags})
        return self.loaded


def context(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj


def fail(message: str, code: int = 1) -> NoReturn:
    # The message is plain text: "[a-z0-9]" in it is no markup to interpret.
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def notice(message: str) -> None:
    """A line for the operator on stderr (truncation, empty results): pipes stay clean."""
    errors.print(message, highlight=False, soft_wrap=True)


def confirm(question: str, yes: bool) -> None:
    """Go on if ``--yes`` was given or the operator says yes on a terminal; else exit.

    Without a terminal there is nobody to ask: a script must say ``--yes`` explicitly.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        fail("not confirmed: no terminal to ask on; pass --yes to go ahead", code=2)
    if not typer.confirm(question, err=True):
        fail("aborted: nothing changed")


def not_available(name: str) -> NoReturn:
    errors.print(f"devicegate {name}: not available yet")
    raise typer.Exit(2)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop. Errors propagate: the root turns them into one line (`failures`)."""
    import uvloop

    return uvloop.run(coroutine)


def print_json_lines(records: list[dict[str, Any]]) -> None:
    """One JSON object per line, as ``--json`` promises."""
    for record in records:
        sys.stdout.write(json.dumps(record, default=str, sort_keys=True) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table on a terminal; aligned plain text otherwise, so a pipe or a narrow
    window gets every id whole (rich would cut cells to fit 80 columns)."""
    cells = [["" if value is None else str(value) for value in row] for row in rows]
    if not sys.stdout.isatty():
        widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
        for line in [columns, *cells]:
            sys.stdout.write(
                "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n"
            )
        return
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console.print(table)
