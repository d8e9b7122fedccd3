"""``devicegate device list|show|disable|enable|revoke``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import typer

from provisioning import admin, store
from provisioning.commands.certs import COLUMNS as CERT_COLUMNS
from provisioning.commands.common import confirm, console, context
from provisioning.commands.records import CLI_ACTOR, show, show_limited, with_connection
from schemas.api import DeviceInfo

group = typer.Typer(help="Inspect, disable, enable and revoke devices.", no_args_is_help=True)

COLUMNS = ["device_id", "fleet", "status", "hardware_id", "created_at", "updated_at"]

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
DeviceId = Annotated[str, typer.Argument(metavar="ID", help="Device id.")]


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="device")


@group.command("list")
def list_(
    ctx: typer.Context,
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    status: Annotated[
        Literal["active", "disabled", "revoked"] | None, typer.Option(help="Only this status.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 1000,
    json_output: JsonOption = False,
) -> None:
    """List devices, newest first."""
    settings = context(ctx).settings()
    devices = with_connection(
        settings,
        lambda conn: store.list_devices(conn, fleet=fleet, status=status, limit=limit + 1),
    )
    show_limited(
        devices, limit=limit, json_output=json_output, title="devices", columns=COLUMNS,
        narrow="--fleet or --status",
    )  # fmt: skip


@group.command("show")
def show_(ctx: typer.Context, device_id: DeviceId, json_output: JsonOption = False) -> None:
    """Show a device and its certificates."""
    settings = context(ctx).settings()
    detail = with_connection(settings, lambda conn: admin.device_detail(conn, device_id))
    if json_output:
        print(json.dumps(detail.model_dump(mode="json"), sort_keys=True))
        return
    for column in COLUMNS:
        console.print(f"{column:12} {getattr(detail, column)}", highlight=False)
    show(detail.certificates, json_output=False, title="certificates", columns=CERT_COLUMNS)


def _act(
    ctx: typer.Context,
    device_id: str,
    action: Callable[..., Awaitable[DeviceInfo]],
    json_output: bool,
) -> None:
    settings = context(ctx).settings()

    def operation(conn: Any) -> Awaitable[DeviceInfo]:
        return action(conn, device_id, actor=CLI_ACTOR, instance=settings.instance_id)

    device = with_connection(settings, operation)
    show([device], json_output=json_output, title="device", columns=COLUMNS)


@group.command("disable")
def disable_(ctx: typer.Context, device_id: DeviceId, json_output: JsonOption = False) -> None:
    """Disable a device: gateways refuse it and cut its sessions; certificates stay valid."""
    _act(ctx, device_id, admin.disable_device, json_output)


@group.command("enable")
def enable_(ctx: typer.Context, device_id: DeviceId, json_output: JsonOption = False) -> None:
    """Enable a disabled device again."""
    _act(ctx, device_id, admin.enable_device, json_output)


@group.command("revoke")
def revoke_(
    ctx: typer.Context,
    device_id: DeviceId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (for scripts).")] = False,
    json_output: JsonOption = False,
) -> None:
    """Revoke a device and all its certificates (final): asks first on a terminal."""
    confirm(f"revoke device {device_id} and all its certificates? This cannot be undone", yes)
    _act(ctx, device_id, admin.revoke_device, json_output)
