"""``devicegate admin-key create|list|revoke``."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available

group = typer.Typer(help="Manage admin API keys.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="admin-key")


@group.command("create")
def create_() -> None:
    """Not available yet."""
    not_available("admin-key create")


@group.command("list")
def list_() -> None:
    """Not available yet."""
    not_available("admin-key list")


@group.command("revoke")
def revoke_() -> None:
    """Not available yet."""
    not_available("admin-key revoke")
