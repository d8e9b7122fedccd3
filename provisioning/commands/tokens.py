"""``devicegate token create|list|revoke``."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

import typer
from pydantic import ValidationError

from provisioning import admin, store
from provisioning.commands.common import console, context, fail
from provisioning.commands.records import CLI_ACTOR, show, with_connection
from schemas.api import TokenCreateRequest
from schemas.validation import sentence

group = typer.Typer(help="Manage bootstrap tokens for fleets and batches.", no_args_is_help=True)

COLUMNS = ["id", "fleet", "state", "uses_left", "uses_allowed", "expires_at", "note"]


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="token")


@group.command("create")
def create_(
    ctx: typer.Context,
    fleet: Annotated[str, typer.Option(help="Fleet the enrolled devices join (created if new).")],
    uses: Annotated[int, typer.Option(help="How many devices may enroll with it.")] = 1,
    ttl: Annotated[str, typer.Option(help="Lifetime, e.g. 8h, 7d.")] = "8h",
    note: Annotated[str | None, typer.Option(help="Free text, e.g. the batch.")] = None,
    allow_reenroll: Annotated[
        bool, typer.Option(help="Let known hardware ids enroll again (old certs are revoked).")
    ] = False,
    attr: Annotated[
        list[str] | None,
        typer.Option(
            "--attr", metavar="KEY=VALUE", help="An attribute its devices receive (repeatable)."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a bootstrap token; the secret is printed once and never stored."""
    settings = context(ctx).settings()
    attributes: dict[str, str] = {}
    for pair in attr or ():
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--attr: expected KEY=VALUE (got {pair!r})", code=2)
        attributes[key] = value
    try:
        request = TokenCreateRequest(
            fleet=fleet,
            uses=uses,
            ttl=ttl,
            note=note,
            allow_reenroll=allow_reenroll,
            attributes=attributes,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"--{first['loc'][0]}: {sentence(first)} (got {first['input']!r})", code=2)
    created = with_connection(
        settings,
        lambda conn: admin.create_token(
            conn, request, actor=CLI_ACTOR, instance=settings.instance_id
        ),
    )
    if json_output:
        print(json.dumps(created.model_dump(mode="json"), sort_keys=True))
        return
    console.print(created.token, highlight=False, soft_wrap=True)
    console.print(
        f"token {created.id}: fleet {created.fleet}, {created.uses_allowed} use(s), "
        f"expires {created.expires_at.isoformat()}. The secret is not shown again.",
        highlight=False,
        style="dim",
    )


@group.command("list")
def list_(
    ctx: typer.Context,
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List tokens (never their secrets)."""
    settings = context(ctx).settings()
    tokens = with_connection(settings, lambda conn: store.list_tokens(conn, fleet=fleet))
    show(tokens, json_output=json_output, title="bootstrap tokens", columns=COLUMNS)


@group.command("revoke")
def revoke_(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id (from token list).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Revoke a token: it enrolls nothing more."""
    settings = context(ctx).settings()
    try:
        parsed = uuid.UUID(token_id)
    except ValueError:
        fail(f"{token_id!r} is not a token id", code=2)
    info = with_connection(
        settings,
        lambda conn: admin.revoke_token(
            conn, parsed, actor=CLI_ACTOR, instance=settings.instance_id
        ),
    )
    show([info], json_output=json_output, title="revoked", columns=COLUMNS)
