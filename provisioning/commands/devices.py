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


attrs = typer.Typer(
    help="Device attributes ({attr.<key>} in policies): set, unset, show, fleet defaults.",
    no_args_is_help=True,
)
group.add_typer(attrs, name="attrs")


def _pairs(pairs: list[str]) -> dict[str, str]:
    from provisioning.policies import PolicyInvalid

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PolicyInvalid(f"{pair[:80]!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _show_attributes(values: dict[str, str], json_output: bool) -> None:
    if json_output:
        print(json.dumps(values, sort_keys=True))
        return
    for key, value in sorted(values.items()):
        console.print(f"{key}={value}", markup=False, highlight=False, soft_wrap=True)


@attrs.command("set")
def attrs_set(
    ctx: typer.Context,
    device_id: DeviceId,
    pairs: Annotated[list[str], typer.Argument(metavar="KEY=VALUE...", help="Attributes.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Set attributes of a device (model, site, line, or any key)."""
    from provisioning import policies
    from provisioning.commands.policy_db import _recorded, cli_actor

    settings = context(ctx).settings()

    def operation(conn: Any) -> Any:
        return policies.set_attributes(
            conn, device_id, _pairs(pairs), actor=cli_actor(), instance=settings.instance_id
        )

    values, version = _recorded(settings, "attributes_set", operation, device_id=device_id)
    _show_attributes(values, json_output)
    if not json_output:
        notice = "nothing changed" if version is None else f"version {version}"
        console.print(f"({notice})", style="dim", highlight=False)


@attrs.command("unset")
def attrs_unset(
    ctx: typer.Context,
    device_id: DeviceId,
    keys: Annotated[list[str], typer.Argument(metavar="KEY...", help="Attribute keys.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Remove attributes of a device."""
    from provisioning import policies
    from provisioning.commands.policy_db import _recorded, cli_actor

    settings = context(ctx).settings()

    def operation(conn: Any) -> Any:
        return policies.set_attributes(
            conn, device_id, {}, unset=keys, actor=cli_actor(), instance=settings.instance_id
        )

    values, version = _recorded(settings, "attributes_set", operation, device_id=device_id)
    _show_attributes(values, json_output)
    if not json_output:
        notice = "nothing changed" if version is None else f"version {version}"
        console.print(f"({notice})", style="dim", highlight=False)


@attrs.command("show")
def attrs_show(
    ctx: typer.Context,
    device_id: DeviceId,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a device's attributes, one KEY=VALUE per line."""
    from provisioning import policies

    settings = context(ctx).settings()
    values = with_connection(settings, lambda conn: policies.get_attributes(conn, device_id))
    _show_attributes(values, json_output)


@attrs.command("defaults")
def attrs_defaults(
    ctx: typer.Context,
    fleet: Annotated[str, typer.Option("--fleet", help="The fleet.")],
    pairs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE...]", help="The new defaults (all of them)."),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every default.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show, or replace, the attributes a fleet's newly enrolled devices receive (a token's
    own defaults, `token create --attr`, take precedence)."""
    from provisioning import policies
    from provisioning.commands.policy_db import _recorded, cli_actor

    settings = context(ctx).settings()
    if not pairs and not clear:
        values = with_connection(settings, lambda conn: policies.fleet_defaults(conn, fleet))
        _show_attributes(values, json_output)
        return

    def operation(conn: Any) -> Any:
        return policies.set_fleet_defaults(
            conn, fleet, _pairs(pairs or []), actor=cli_actor(), instance=settings.instance_id
        )

    version = _recorded(settings, "fleet_defaults_set", operation)
    notice = "nothing changed" if version is None else f"version {version}"
    console.print(f"fleet {fleet} defaults set ({notice})", highlight=False)
