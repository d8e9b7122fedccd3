"""``devicegate admin-key create|list|revoke``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from provisioning import admin, store
from provisioning.commands.common import console, context
from provisioning.commands.records import CLI_ACTOR, show, with_connection

group = typer.Typer(help="Manage admin API keys.", no_args_is_help=True)

COLUMNS = ["id", "name", "created_at", "revoked_at"]


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="admin-key")


@group.command("create")
def create_(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create an admin key; the secret is printed once and never stored."""
    settings = context(ctx).settings()
    created = with_connection(
        settings,
        lambda conn: admin.create_admin_key(
            conn, name, actor=CLI_ACTOR, instance=settings.instance_id
        ),
    )
    if json_output:
        print(json.dumps(created.model_dump(mode="json"), sort_keys=True))
        return
    console.print(created.key, highlight=False, soft_wrap=True)
    console.print(
        f"admin key {created.id} ({created.name}). The secret is not shown again.",
        highlight=False,
        style="dim",
    )


@group.command("list")
def list_(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List admin keys (never their secrets)."""
    settings = context(ctx).settings()
    keys = with_connection(settings, store.list_admin_keys)
    show(keys, json_output=json_output, title="admin keys", columns=COLUMNS)


@group.command("revoke")
def revoke_(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="Key id or name.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Revoke an admin key."""
    settings = context(ctx).settings()
    info = with_connection(
        settings,
        lambda conn: admin.revoke_admin_key(
            conn, key, actor=CLI_ACTOR, instance=settings.instance_id
        ),
    )
    show([info], json_output=json_output, title="revoked", columns=COLUMNS)
