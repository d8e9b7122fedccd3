"""``devicegate demo`` and ``devicegate simulate``."""

from __future__ import annotations

import typer

from provisioning.commands.common import not_available


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("simulate")(simulate)


def demo() -> None:
    """Run the whole product end to end on this machine (not available yet)."""
    not_available("demo")


def simulate() -> None:
    """Load and soak a deployment with simulated devices (not available yet)."""
    not_available("simulate")
