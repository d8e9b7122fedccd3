"""Policies in PostgreSQL: the NOTIFY channel and the snapshot gateways load.

The tables are schemas/sql/0009_policies.sql; provisioning (``provisioning.policies``) writes
them, gateways only read them with `load_policy_snapshot`. This module needs nothing but
asyncpg, so the gateway may import it.

Invariants:

* One global version numbers the whole state (policies, attachments, groups, memberships,
  device attributes). Every committed transaction that changes any of it bumps the version
  once and queues ``pg_notify(POLICY_CHANNEL, '<version>')`` in the same transaction (the
  migration's deferred triggers guarantee it whoever writes), so a listener hears only of
  committed versions, in commit order.
* `load_policy_snapshot` reads the version and every table in one REPEATABLE READ, read-only
  transaction: the snapshot is exactly the state of ``snapshot.version``. A listener that
  receives a version greater than the one it holds reloads; a smaller or equal one is
  already included.
* Documents come back as the JSON stored (the canonical dump of ``schemas.policy``'s model at
  write time); turning them into decisions is ``gateway.policy.PolicySet.from_snapshot``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

import asyncpg

__all__ = [
    "ATTACHMENT_KINDS",
    "POLICY_CHANNEL",
    "Attachment",
    "PolicySnapshot",
    "load_policy_snapshot",
]

POLICY_CHANNEL: Final = "devicegate_policy"
"""Carries the new global policy version (decimal text) of each committed change."""

TargetKind = Literal["fleet", "group", "device"]
ATTACHMENT_KINDS: Final[tuple[TargetKind, ...]] = ("fleet", "group", "device")

Attachment = tuple[str, str, str]
"""``(policy_name, target_kind, target)``; ``target_kind`` is one of `ATTACHMENT_KINDS`."""


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """The policy state of one global version.

    Attributes:
        version: The global policy version (0: nothing was ever written).
        documents: Policy name -> its current document (JSON, as stored).
        attachments: ``(policy_name, target_kind, target)``, sorted.
        groups: Device id -> the groups it belongs to (devices in no group are absent).
        attributes: Device id -> its attributes (devices without any are absent).
    """

    version: int
    documents: Mapping[str, Mapping[str, Any]] = field(default_factory=_empty)
    attachments: tuple[Attachment, ...] = ()
    groups: Mapping[str, frozenset[str]] = field(default_factory=_empty)
    attributes: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)

    def groups_of(self, device_id: str) -> frozenset[str]:
        return self.groups.get(device_id, frozenset())

    def attributes_of(self, device_id: str) -> Mapping[str, str]:
        return self.attributes.get(device_id, MappingProxyType({}))

    def attached_to(self, kind: TargetKind, target: str) -> tuple[str, ...]:
        """The names of the policies attached to one target, sorted."""
        return tuple(name for name, k, t in self.attachments if k == kind and t == target)


_VERSION: Final = "SELECT version FROM policy_version"
_DOCUMENTS: Final = """
SELECT name, document FROM (
    SELECT DISTINCT ON (name) name, document FROM policies ORDER BY name, version DESC
) AS current WHERE document IS NOT NULL ORDER BY name
"""
_ATTACHMENTS: Final = (
    "SELECT policy_name, target_kind, target FROM policy_attachments ORDER BY 1, 2, 3"
)
_GROUPS: Final = (
    "SELECT device_id, array_agg(group_name ORDER BY group_name) AS groups "
    "FROM group_members GROUP BY device_id"
)
_ATTRIBUTES: Final = "SELECT device_id, key, value FROM device_attributes ORDER BY device_id, key"


def _document(value: Any) -> Mapping[str, Any]:
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(parsed, dict):
        raise ValueError("a stored policy document is not a JSON object")
    return parsed


async def load_policy_snapshot(conn: asyncpg.Connection) -> PolicySnapshot:
    """The whole policy state, read in one REPEATABLE READ, read-only transaction.

    Raises:
        asyncpg.PostgresError: as asyncpg raises it (an unmigrated database included).
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version = await conn.fetchval(_VERSION)
        rows = await conn.fetch(_DOCUMENTS)
        documents = {row["name"]: _document(row["document"]) for row in rows}
        attachments = tuple(
            (row["policy_name"], row["target_kind"], row["target"])
            for row in await conn.fetch(_ATTACHMENTS)
        )
        groups = {row["device_id"]: frozenset(row["groups"]) for row in await conn.fetch(_GROUPS)}
        attributes: dict[str, dict[str, str]] = {}
        for row in await conn.fetch(_ATTRIBUTES):
            attributes.setdefault(row["device_id"], {})[row["key"]] = row["value"]
    return PolicySnapshot(
        version=int(version),
        documents=MappingProxyType(documents),
        attachments=attachments,
        groups=MappingProxyType(groups),
        attributes=MappingProxyType(
            {device: MappingProxyType(values) for device, values in attributes.items()}
        ),
    )
