"""``devicegate serve provisioning|gateway``."""

from __future__ import annotations

from typing import Annotated

import typer

from provisioning.commands.common import context, not_available, run

group = typer.Typer(help="Run the provisioning service or the MQTT gateway.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="serve")


@group.command("provisioning")
def provisioning(
    ctx: typer.Context,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT (env DEVICEGATE_PROVISIONING_LISTEN).")
    ] = None,
) -> None:
    """Run the provisioning HTTPS service until SIGTERM (needs the CA passphrase)."""
    from provisioning.server import serve

    settings = context(ctx).settings(provisioning_listen=listen)
    run(serve(settings))


@group.command("gateway")
def gateway() -> None:
    """Run the mutual-TLS MQTT gateway (not available yet)."""
    not_available("serve gateway")
