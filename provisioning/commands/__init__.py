"""The ``devicegate`` command groups, one module each."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach every command group to the root application."""
    from provisioning.commands import (
        admin_keys,
        audit,
        ca,
        certs,
        db,
        demo,
        device_side,
        devices,
        serve,
        tokens,
    )

    for module in (ca, db, admin_keys, tokens, devices, certs, serve, device_side, audit, demo):
        module.register(app)
