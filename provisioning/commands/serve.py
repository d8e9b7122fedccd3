"""``devicegate serve provisioning|gateway``."""

from __future__ import annotations

import os
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
    from provisioning.http.server import serve

    options = context(ctx)
    settings = options.settings(provisioning_listen=listen)
    options.listen = settings.provisioning_listen  # named if the port is taken
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
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Worker processes sharing the port with SO_REUSEPORT; 0 = one per CPU "
            "(env DEVICEGATE_WORKERS). 1 runs in this process.",
        ),
    ] = None,
    take_over: Annotated[
        bool,
        typer.Option(
            "--take-over",
            help="Replace the gateway running on this state directory without a gap: "
            "listen beside it (SO_REUSEPORT), and once every worker is ready, SIGTERM it.",
        ),
    ] = False,
) -> None:
    """Run the mutual-TLS MQTT gateway until SIGTERM (needs no CA key).

    SIGTERM drains (in-flight packets finish, sessions end with DISCONNECT 0x8B on MQTT 5,
    the event spool is shipped) and exits 0; SIGHUP reloads the policy file.

    State (the event spool and the signed audit checkpoints) goes to the state directory:
    $STATE_DIRECTORY under systemd, else /var/lib/devicegate (DEVICEGATE_SPOOL_DIR and
    DEVICEGATE_CHECKPOINT_DIR override it). The audit key is pki-dir/audit.key.

    A second gateway on the same address or state directory is refused, unless started
    with --take-over (docs/operations.md, "Restarting without a gap").
    """
    # Imported here: the control plane does not load the data plane unless asked to.
    from gateway.serve import raise_fd_limit, serve

    options = context(ctx)
    settings = options.settings(
        gateway_listen=listen, upstream_url=upstream, policy_file=policy, workers=workers
    )
    options.listen = settings.gateway_listen  # named if the port is taken
    count = settings.workers or os.cpu_count() or 1
    if count == 1 and not take_over:  # a take-over needs the supervisor
        raise_fd_limit()
        run(serve(settings))
        return
    from gateway.workers import supervise

    # A port in use, the TLS files or the policy file: one line (commands.failures).
    raise typer.Exit(supervise(settings, workers=count, take_over=take_over))
