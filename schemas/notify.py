"""The PostgreSQL NOTIFY contract between provisioning (sender) and gateways (listeners).

Provisioning sends one notification on `REVOCATION_CHANNEL` in the same transaction as the
change, so a listener never sees a change that was rolled back. The payload is a
`RevocationNotice` as JSON (well under NOTIFY's 8000-byte limit).

Gateway workers announce each session they admit on `SESSIONS_CHANNEL` (a `SessionNotice`),
so that a device's older session on another worker or instance is taken over.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

REVOCATION_CHANNEL = "devicegate_revocation"
EVENTS_CHANNEL = "devicegate_events"
"""Carries the id and time of newly stored auth events, for ``audit --follow`` and live views."""
SESSIONS_CHANNEL = "devicegate_sessions"
"""Carries a `SessionNotice` per session a gateway worker admits (cross-worker takeover)."""


class RevocationNotice(BaseModel):
    """What changed: a certificate revoked or superseded, or a device's status."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["certificate", "device"]
    device_id: str
    serial: str | None = None
    status: Literal["active", "disabled", "revoked", "superseded"]


class SessionNotice(BaseModel):
    """A gateway worker is admitting a session for ``(device_id, client_id)``.

    Every worker that holds an older session for the same pair ends it
    (``session_taken_over``). "Older" is the order in which PostgreSQL delivers the
    notices, which is the same for every listener.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    client_id: str | None
    instance: str
    worker: str
    session_id: str
