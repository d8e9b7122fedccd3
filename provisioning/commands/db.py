"""``devicegate db migrate``."""

from __future__ import annotations

import typer

from provisioning.commands.common import console, context, run
from provisioning.db import connect
from schemas.migrate import migrate as apply_migrations

group = typer.Typer(help="Manage the database schema.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="db")


@group.command("migrate")
def migrate(ctx: typer.Context) -> None:
    """Apply pending migrations (safe to run from several processes at once)."""
    settings = context(ctx).settings()

    async def _migrate() -> list[str]:
        connection = await connect(settings.database_url)
        try:
            return await apply_migrations(connection)
        finally:
            await connection.close()

    applied = run(_migrate())
    if applied:
        console.print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        console.print("database is up to date")
