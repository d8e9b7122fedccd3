"""``devicegate enroll`` and ``devicegate renew``: the device side."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available


def register(app: typer.Typer) -> None:
    app.command("enroll")(enroll)
    app.command("renew")(renew)


def enroll() -> None:
    """Make a key here, enroll with a bootstrap token, write the files (not available yet)."""
    not_available("enroll")


def renew() -> None:
    """Renew this device's certificate with its current one (not available yet)."""
    not_available("renew")
