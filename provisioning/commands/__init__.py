"""The ``devicegate`` command: `cli` assembles the groups, one module each.

A command module parses options and calls the packages below it (``pki``, ``audit``,
``agent``, ``demo``, the registry modules, the server in ``http``); it holds no logic of
its own that another surface would need. The only import of ``gateway`` in the control
plane is in `serve` (``devicegate serve gateway``) and in `policy` (``devicegate policy
explain`` runs ``gateway.policy``'s own decision), each inside the command.

`COMMANDS` names every top-level command, the module that defines it and its one-line help:
``devicegate --help`` prints the table without importing a module, and a command's module
is imported only when that command runs (`provisioning.commands.root`), so the device-side
``enroll`` never loads asyncpg, the CA code or the gateway.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "ca": ("ca", "Create and inspect the certificate authority."),
    "db": ("db", "Manage the database schema."),
    "admin-key": ("admin_keys", "Manage admin API keys."),
    "token": ("tokens", "Manage bootstrap tokens for fleets and batches."),
    "device": ("devices", "Inspect, disable, enable and revoke devices."),
    "cert": ("certs", "List and revoke certificates."),
    "serve": ("serve", "Run the provisioning service or the MQTT gateway."),
    "policy": ("policy", "Topic policies: check, apply, export, attach, explain."),
    "group": ("groups", "Manage device groups (policy targets)."),
    "ticket-keys": ("ticket_keys", "TLS session ticket keys of the gateway."),
    "enroll": (
        "device_side",
        "Make a key on this device, enroll with a bootstrap token, write the files.",
    ),
    "renew": (
        "device_side",
        "Renew this device's certificate with its current one, for a new key.",
    ),
    "audit": ("audit", "Query and verify the auth event log."),
    "demo": ("demo", "Run the whole product end to end on this machine, on scratch state."),
    "simulate": (
        "demo",
        "Load and soak a deployment with simulated devices, bounded by --duration.",
    ),
}
"""name -> (module in this package, short help shown by ``devicegate --help``)."""
