"""``devicegate cert list|revoke``."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from provisioning import admin, store
from provisioning.commands.common import context
from provisioning.commands.records import CLI_ACTOR, show, show_limited, with_connection

group = typer.Typer(help="List and revoke certificates.", no_args_is_help=True)

COLUMNS = ["serial", "device_id", "status", "key_type", "not_after", "revoked_at"]


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="cert")


@group.command("list")
def list_(
    ctx: typer.Context,
    device: Annotated[str | None, typer.Option(help="Only this device's certificates.")] = None,
    status: Annotated[
        Literal["active", "superseded", "revoked"] | None, typer.Option(help="Only this status.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 1000,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List certificates, newest first."""
    settings = context(ctx).settings()
    certificates = with_connection(
        settings,
        lambda conn: store.list_certificates(
            conn, device_id=device, status=status, limit=limit + 1
        ),
    )
    show_limited(
        certificates, limit=limit, json_output=json_output, title="certificates",
        columns=COLUMNS, narrow="--device or --status",
    )  # fmt: skip


@group.command("revoke")
def revoke_(
    ctx: typer.Context,
    serial: Annotated[str, typer.Argument(metavar="SERIAL", help="Serial number, hex.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Revoke one certificate; it appears in the CRL and gateways cut its sessions."""
    settings = context(ctx).settings()
    info = with_connection(
        settings,
        lambda conn: admin.revoke_certificate(
            conn, serial, actor=CLI_ACTOR, instance=settings.instance_id
        ),
    )
    show([info], json_output=json_output, title="certificate", columns=COLUMNS)
