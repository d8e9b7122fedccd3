"""Request and response bodies of the provisioning HTTP API (served as OpenAPI)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.durations import Duration
from schemas.events import AuthEvent
from schemas.validation import FLEET_PATTERN


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Problem(_Model):
    """An RFC 9457 problem document; ``reason`` is devicegate's stable reason code."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    reason: str


class EnrollRequest(_Model):
    token: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Bootstrap token (dgt_...). Without it, the device is authenticated by "
        "the manufacturer certificate (IDevID) it presents in the TLS handshake.",
    )
    csr: str = Field(min_length=1, max_length=16_384, description="PKCS#10 CSR, PEM.")
    hardware_id: str | None = Field(
        None, min_length=1, max_length=128, description="Stable id of the hardware, if any."
    )


class CertificateBundle(_Model):
    device_id: str
    fleet: str
    serial: str
    certificate: str = Field(description="The device certificate, PEM.")
    chain: str = Field(description="Issuing CA then root CA, PEM.")
    not_before: datetime
    not_after: datetime


class RenewRequest(_Model):
    csr: str = Field(min_length=1, max_length=16_384, description="CSR for the new key, PEM.")


class TokenCreateRequest(_Model):
    fleet: str = Field(pattern=FLEET_PATTERN)
    uses: int = Field(1, ge=1, le=1_000_000)
    ttl: Duration = Field(timedelta(hours=8), description="Lifetime, e.g. 8h or 7d.")
    note: str | None = Field(None, max_length=500)
    allow_reenroll: bool = False


class TokenInfo(_Model):
    id: uuid.UUID
    fleet: str
    uses_allowed: int
    uses_left: int
    allow_reenroll: bool
    note: str | None
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    state: Literal["active", "expired", "exhausted", "revoked"]


class TokenCreated(TokenInfo):
    token: str = Field(description="The secret. Shown once; only its hash is stored.")


class DeviceInfo(_Model):
    device_id: str
    fleet: str
    hardware_id: str | None
    status: Literal["active", "disabled", "revoked"]
    created_at: datetime
    updated_at: datetime


class CertificateInfo(_Model):
    serial: str
    device_id: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    status: Literal["active", "superseded", "revoked"]
    revoked_at: datetime | None
    key_type: str


class DeviceDetail(DeviceInfo):
    certificates: list[CertificateInfo]


class AdminKeyCreated(_Model):
    id: uuid.UUID
    name: str
    key: str = Field(description="The secret. Shown once; only its hash is stored.")


class EventPage(_Model):
    events: list[AuthEvent]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class AdminKeyInfo(_Model):
    id: uuid.UUID
    name: str
    created_at: datetime
    revoked_at: datetime | None
