"""``devicegate audit``: query, summarise, verify and prune the auth event log."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available

group = typer.Typer(help="Query and verify the auth event log.", invoke_without_command=True)


def register(app: typer.Typer) -> None:
    app.add_typer(group, name="audit")


@group.callback()
def audit(ctx: typer.Context) -> None:
    """List auth events (not available yet)."""
    if ctx.invoked_subcommand is None:
        not_available("audit")


@group.command("summary")
def summary() -> None:
    """Counts by outcome and reason (not available yet)."""
    not_available("audit summary")


@group.command("verify")
def verify() -> None:
    """Verify every hash chain (not available yet)."""
    not_available("audit verify")


@group.command("prune")
def prune() -> None:
    """Drop old partitions (not available yet)."""
    not_available("audit prune")
