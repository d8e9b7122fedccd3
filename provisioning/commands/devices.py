"""``devicegate device list|show|disable|enable|revoke``."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available

group = typer.Typer(help="Inspect, disable, enable and revoke devices.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="device")


@group.command("list")
def list_() -> None:
    """Not available yet."""
    not_available("device list")


@group.command("show")
def show_() -> None:
    """Not available yet."""
    not_available("device show")


@group.command("disable")
def disable_() -> None:
    """Not available yet."""
    not_available("device disable")


@group.command("enable")
def enable_() -> None:
    """Not available yet."""
    not_available("device enable")


@group.command("revoke")
def revoke_() -> None:
    """Not available yet."""
    not_available("device revoke")
