"""The audit console: server-rendered pages under ``/console/`` for a security team.

Overview (connections over time, top denials, expiring certificates, gateway last-seen),
the event log with CLI filters, export and a live mode, device pages with operator actions,
and the hash-chain verification. See docs/console.md.

Mounted by the HTTPS server (``http/``), whose application keys and problem table it
shares; reads through ``audit`` and acts through `provisioning.admin`, like the CLI. Never
imports ``commands`` or ``demo``.
"""

from __future__ import annotations

from provisioning.console.app import setup

__all__ = ["setup"]
