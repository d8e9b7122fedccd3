"""The audit console: server-rendered pages under ``/console/`` for a security team.

Overview (connections over time, top denials, expiring certificates, gateway last-seen),
the event log with CLI filters, export and a live mode, device pages with operator actions,
and the hash-chain verification. See docs/console.md.
"""

from __future__ import annotations

from provisioning.console.app import setup

__all__ = ["setup"]
