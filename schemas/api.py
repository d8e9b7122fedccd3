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
    token: str = Field(min_length=1, max_length=256, description="Bootstrap token (dgt_...).")
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
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Attributes each device it enrolls receives (over its fleet's defaults); "
            "keys a-z0-9_, values up to 256 characters, at most 64."
        ),
    )


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
    attributes: dict[str, str] = Field(default_factory=dict)
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


# --- policies (issue 23) -------------------------------------------------------------

AttachmentTarget = str
"""``fleet:NAME``, ``group:NAME`` or ``device:ID``."""


class PolicyPut(_Model):
    """``PUT /v1/policies/{name}``: a policy document (as `policy export --format json`
    prints it) and targets to attach it to."""

    document: dict[str, object] = Field(description="The policy document (JSON).")
    attach: list[AttachmentTarget] = Field(default_factory=list, max_length=100)


class PolicyApplied(_Model):
    name: str
    version: int = Field(description="The global policy version now in force.")
    changed: bool = Field(description="False: the document was already current.")
    attached: list[AttachmentTarget] = Field(default_factory=list)


class PolicyInfo(_Model):
    name: str
    version: int = Field(description="The global version that wrote its current revision.")
    sha256: str | None
    attachments: list[AttachmentTarget]
    document: dict[str, object] | None = None


class PolicyRevisionInfo(_Model):
    name: str
    version: int
    created_at: datetime
    actor: str
    sha256: str | None
    deleted: bool


class PolicyVersion(_Model):
    version: int = Field(description="The global policy version (bumped by every change).")


class AttachmentInfo(_Model):
    policy: str
    target_kind: Literal["fleet", "group", "device"]
    target: str


class AttributesPut(_Model):
    """``PUT /v1/devices/{id}/attributes``: the device's attributes, all of them."""

    attributes: dict[str, str] = Field(max_length=64)


class AttributesInfo(_Model):
    device_id: str
    attributes: dict[str, str]
    groups: list[str] = Field(default_factory=list)
    policy_version: int


class GroupPut(_Model):
    description: str = Field("", max_length=500)


class GroupMembersPut(_Model):
    """``POST /v1/groups/{name}/members``: devices to add or remove."""

    add: list[str] = Field(default_factory=list, max_length=1000)
    remove: list[str] = Field(default_factory=list, max_length=1000)


class GroupInfo(_Model):
    name: str
    description: str
    members: int
    created_at: datetime
    devices: list[str] | None = None


class ExplainRequest(_Model):
    device_id: str = Field(min_length=1, max_length=128)
    action: Literal["connect", "publish", "subscribe", "receive", "retain"]
    topic: str = Field(
        min_length=1, max_length=65535, description="Topic, filter, or (connect) client id."
    )
    qos: int = Field(0, ge=0, le=2)
    retain: bool = False


class ExplainResult(_Model):
    device_id: str
    fleet: str
    action: str
    topic: str
    decision: Literal["allowed", "denied"]
    statement: str = Field(
        description="The deciding statement, <policy>/<id>; default-deny if none matched."
    )
    policy_version: int
    policies: list[str] = Field(
        default_factory=list, description="The policies that apply to the device."
    )
    why: str
    notes: list[str] = Field(
        default_factory=list, description="Resources left out for this device, and why."
    )
    groups: list[str] = Field(default_factory=list)
