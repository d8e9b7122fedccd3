"""``devicegate ticket-keys rotate``: the gateway's TLS session ticket keys (a shared file).

Every gateway worker and instance reads the same file (DEVICEGATE_TLS_TICKET_KEYS, default
``<pki_dir>/ticket-keys``) and re-reads it within a second of a change, so a ticket issued
by one resumes on every other. Rotation: the new key encrypts, older keys only decrypt
until a later rotation drops them (docs/operations.md).
"""

from __future__ import annotations

from typing import Annotated

import typer

from provisioning.commands.common import console, context, fail
from schemas.ticket_keys import MAX_KEYS, TICKET_KEYS_FILE, TicketKeyError, rotate_ticket_keys

group = typer.Typer(help="TLS session ticket keys of the gateway.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="ticket-keys")


@group.command("rotate")
def rotate(
    ctx: typer.Context,
    keep: Annotated[
        int,
        typer.Option(
            min=0,
            max=MAX_KEYS - 1,
            help="Older keys kept for decryption (tickets issued under a dropped key do a "
            "full handshake).",
        ),
    ] = 2,
) -> None:
    """Put a new current key first in the ticket key file (creating it 0600 if missing)."""
    settings = context(ctx).settings()
    path = settings.tls_ticket_keys or settings.pki_dir / TICKET_KEYS_FILE
    try:
        keys = rotate_ticket_keys(path, keep=keep)
    except (TicketKeyError, OSError) as exc:
        fail(str(exc))
    console.print(
        f"{path}: new current key {keys[0][:16].hex()}, {len(keys) - 1} older kept",
        highlight=False,
        soft_wrap=True,
    )
