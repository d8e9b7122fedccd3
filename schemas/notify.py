"""The PostgreSQL NOTIFY contract between provisioning (sender) and gateways (listeners).

Provisioning sends one notification on `REVOCATION_CHANNEL` in the same transaction as the
change, so a listener never sees a change that was rolled back. The payload is a
`RevocationNotice` as JSON (well under NOTIFY's 8000-byte limit).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

REVOCATION_CHANNEL = "devicegate_revocation"
EVENTS_CHANNEL = "devicegate_events"
"""Carries the id and time of newly stored auth events, for ``audit --follow`` and live views."""


class RevocationNotice(BaseModel):
    """What changed: a certificate revoked or superseded, or a device's status."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["certificate", "device"]
    device_id: str
    serial: str | None = None
    status: Literal["active", "disabled", "revoked", "superseded"]
