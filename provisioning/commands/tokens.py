"""``devicegate token create|list|revoke``."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available

group = typer.Typer(help="Manage bootstrap tokens for fleets and batches.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="token")


@group.command("create")
def create_() -> None:
    """Not available yet."""
    not_available("token create")


@group.command("list")
def list_() -> None:
    """Not available yet."""
    not_available("token list")


@group.command("revoke")
def revoke_() -> None:
    """Not available yet."""
    not_available("token revoke")
