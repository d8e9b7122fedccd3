"""``devicegate cert list|revoke``."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available

group = typer.Typer(help="List and revoke certificates.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="cert")


@group.command("list")
def list_() -> None:
    """Not available yet."""
    not_available("cert list")


@group.command("revoke")
def revoke_() -> None:
    """Not available yet."""
    not_available("cert revoke")
