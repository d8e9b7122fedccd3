"""``devicegate serve provisioning|gateway``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from provisioning.commands.common import context, run

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
def gateway(
    ctx: typer.Context,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT (env DEVICEGATE_GATEWAY_LISTEN).")
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="Upstream broker URL (env DEVICEGATE_UPSTREAM_URL).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Topic policy file (env DEVICEGATE_POLICY_FILE).")
    ] = None,
) -> None:
    """Run the mutual-TLS MQTT gateway until SIGTERM (needs no CA key)."""
    # Imported here: the control plane does not load the data plane unless asked to.
    from gateway.serve import serve

    settings = context(ctx).settings(
        gateway_listen=listen, upstream_url=upstream, policy_file=policy
    )
    run(serve(settings))
