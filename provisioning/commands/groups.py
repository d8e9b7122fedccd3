"""``devicegate group create|delete|add|remove|list|show``: device groups, which policies
are attached to and statements may name. Each change is one ``policy`` auth event."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from provisioning.commands.common import console, context, print_json_lines, print_table
from provisioning.commands.policy_db import _recorded, cli_actor
from provisioning.commands.records import with_connection

group = typer.Typer(help="Manage device groups (policy targets).", no_args_is_help=True)

GroupName = Annotated[str, typer.Argument(metavar="GROUP", help="Group name.")]
Devices = Annotated[list[str], typer.Argument(metavar="DEVICE...", help="Device ids.")]


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="group")


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@group.command("create")
def create_(
    ctx: typer.Context,
    name: GroupName,
    description: Annotated[str, typer.Option(help="Free text.")] = "",
) -> None:
    """Create a group."""
    from provisioning import policies

    settings = context(ctx).settings()
    version = _recorded(
        settings,
        "group_create",
        lambda conn: policies.create_group(
            conn, name, description, actor=cli_actor(), instance=settings.instance_id
        ),
    )
    _say(f"group {name!r} created (version {version})")


@group.command("delete")
def delete_(ctx: typer.Context, name: GroupName) -> None:
    """Delete a group, its memberships and the policy attachments to it."""
    from provisioning import policies

    settings = context(ctx).settings()
    version = _recorded(
        settings,
        "group_delete",
        lambda conn: policies.delete_group(
            conn, name, actor=cli_actor(), instance=settings.instance_id
        ),
    )
    _say(f"group {name!r} deleted (version {version})")


def _members(ctx: typer.Context, name: str, devices: list[str], *, add: bool) -> None:
    from provisioning import policies

    settings = context(ctx).settings()

    def operation(conn: Any) -> Any:
        return policies.change_members(
            conn, name, devices, add=add, actor=cli_actor(), instance=settings.instance_id
        )

    changed, version = _recorded(settings, "group_add" if add else "group_remove", operation)
    verb = "added to" if add else "removed from"
    if version is None:
        _say(f"group {name!r}: nothing changed")
    else:
        _say(f"{len(changed)} device(s) {verb} group {name!r} (version {version})")


@group.command("add")
def add_(ctx: typer.Context, name: GroupName, devices: Devices) -> None:
    """Add devices to a group."""
    _members(ctx, name, devices, add=True)


@group.command("remove")
def remove_(ctx: typer.Context, name: GroupName, devices: Devices) -> None:
    """Remove devices from a group."""
    _members(ctx, name, devices, add=False)


@group.command("list")
def list_(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List groups with their member counts."""
    from provisioning import policies

    settings = context(ctx).settings()
    groups = with_connection(settings, policies.list_groups)
    records = [
        {"name": g.name, "members": g.members, "description": g.description,
         "created_at": g.created_at.isoformat()}
        for g in groups
    ]  # fmt: skip
    if json_output:
        print_json_lines(records)
        return
    columns = ["name", "members", "description", "created_at"]
    print_table("groups", columns, [[r[c] for c in columns] for r in records])


@group.command("show")
def show_(ctx: typer.Context, name: GroupName) -> None:
    """List the devices of a group."""
    from provisioning import policies

    settings = context(ctx).settings()
    for device_id in with_connection(settings, lambda conn: policies.group_members(conn, name)):
        _say(device_id)
