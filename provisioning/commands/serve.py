"""``devicegate serve provisioning|gateway``."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available

group = typer.Typer(help="Run the provisioning service or the MQTT gateway.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="serve")


@group.command("provisioning")
def provisioning() -> None:
    """Run the provisioning HTTPS service (not available yet)."""
    not_available("serve provisioning")


@group.command("gateway")
def gateway() -> None:
    """Run the mutual-TLS MQTT gateway (not available yet)."""
    not_available("serve gateway")
