"""The ``devicegate`` command: `cli` assembles the groups, one module each.

A command module parses options and calls the packages below it (``pki``, ``audit``,
``agent``, ``demo``, the registry modules, the server in ``http``); it holds no logic of
its own that another surface would need. The only import of ``gateway`` in the control
plane is in `serve` (``devicegate serve gateway``) and in `policy` (``devicegate policy
explain`` runs ``gateway.policy``'s own decision), each inside the command.
"""

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
        policy,
        serve,
        ticket_keys,
        tokens,
    )

    for module in (
        ca,
        db,
        admin_keys,
        tokens,
        devices,
        certs,
        serve,
        policy,
        ticket_keys,
        device_side,
        audit,
        demo,
    ):
        module.register(app)
