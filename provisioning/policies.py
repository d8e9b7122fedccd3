"""Policies, attachments, groups and device attributes in PostgreSQL: every change an event.

Each write is one transaction that changes the state, bumps the global policy version
(``devicegate_policy_bump()``, which queues ``pg_notify(POLICY_CHANNEL, version)``), and
appends one ``policy`` auth event naming the actor, the action, the new version and a diff.
A request that changes nothing writes nothing and makes no version. A refused request
(invalid document, over a limit, unknown target) changes nothing and is recorded as one
denied ``policy`` event by `record_refusal` (the surfaces call it; only authenticated
operators reach these functions, so the audit rows they cause are bounded by what an
operator does).

Lock order, as everywhere in provisioning: device rows first (``FOR KEY SHARE``, what the
foreign keys would take), then the event chain head (`eventlog.lock_head`), then the
policy version row (the bump). The chain head serialises provisioning's writers, so the
diff is taken against the state no other writer can change before commit.

Limits (the input budget of one request): a document of at most `MAX_DOCUMENT_BYTES` as
canonical JSON and `MAX_STATEMENTS` statements; `MAX_ATTRIBUTES` attributes per device,
keys of `KEY_RULE`, values of at most `MAX_VALUE_CHARS` characters; `MAX_MEMBERS` devices
per group request; diffs in events cut at `MAX_DIFF_CHARS`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg
from pydantic import ValidationError

from provisioning import eventlog
from provisioning.errors import Conflict, NotFound, RequestInvalid
from schemas.errors import DevicegateError
from schemas.events import EventType, Outcome, Reason
from schemas.policy import ANY_FLEET, Policy, problems_of
from schemas.policy import NAME_PATTERN as _MODEL_NAME_PATTERN
from schemas.policy_store import ATTACHMENT_KINDS
from schemas.validation import FLEET_PATTERN

Connection = Any

MAX_DOCUMENT_BYTES: Final = 64 * 1024
MAX_STATEMENTS: Final = 256
MAX_POLICIES: Final = 1000
MAX_ATTRIBUTES: Final = 64
MAX_VALUE_CHARS: Final = 256
MAX_MEMBERS: Final = 1000
MAX_GROUPS_PER_DEVICE: Final = 64
MAX_DIFF_CHARS: Final = 4000

NAME_PATTERN: Final = _MODEL_NAME_PATTERN
NAME_RULE: Final = "1-64 of A-Z, a-z, 0-9, '_', '.', '-', starting with a letter or digit"
KEY_PATTERN: Final = r"^[a-z][a-z0-9_]{0,62}$"
KEY_RULE: Final = "1-63 of a-z, 0-9, '_', starting with a letter"
WELL_KNOWN_KEYS: Final = ("model", "site", "line")
_WELL_KNOWN_VALUE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WELL_KNOWN_RULE: Final = "1-64 of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit"
_DEVICE_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")

DEFAULT_POLICY: Final = "default"


class PolicyInvalid(RequestInvalid):
    """A policy document, name, attribute or group request that is refused.

    Attributes:
        problems: One sentence per problem (a location first where there is one).
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


# --- validation (pure) -----------------------------------------------------------------


def check_name(name: str, what: str = "policy name") -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise PolicyInvalid(f"{what} must be {NAME_RULE} (got {name[:80]!r})")
    return name


def check_device_id(device_id: str) -> str:
    if not _DEVICE_PATTERN.fullmatch(device_id):
        raise PolicyInvalid(f"not a device id: {device_id[:80]!r}")
    return device_id


def check_target(kind: str, target: str) -> tuple[str, str]:
    """A ``(kind, target)`` attachment target, checked for form (not existence)."""
    if kind not in ATTACHMENT_KINDS:
        raise PolicyInvalid(f"attachment kind must be one of {', '.join(ATTACHMENT_KINDS)}")
    if kind == "fleet" and target != ANY_FLEET and not re.fullmatch(FLEET_PATTERN, target):
        raise PolicyInvalid(f"not a fleet name (nor {ANY_FLEET!r}): {target[:80]!r}")
    if kind == "group":
        check_name(target, "group name")
    if kind == "device":
        check_device_id(target)
    return kind, target


def parse_target(text: str) -> tuple[str, str]:
    """``fleet:F``, ``group:G`` or ``device:D``."""
    kind, sep, target = text.partition(":")
    if not sep or not target:
        raise PolicyInvalid(f"{text[:80]!r}: expected fleet:NAME, group:NAME or device:ID")
    return check_target(kind, target)


def statement_count(document: Mapping[str, Any]) -> int:
    """How many statements a canonical policy document holds."""
    statements = document.get("statements")
    return len(statements) if isinstance(statements, list) else 0


def canonical_json(document: Mapping[str, Any]) -> str:
    """The one text of a document: sorted keys, two-space indent (diffs are per line)."""
    return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False)


def canonical_document(raw: object, *, source: str = "document") -> dict[str, Any]:
    """Validate ``raw`` (parsed JSON or TOML) as one named policy (`schemas.policy.Policy`:
    description, statements, drop_denied_publish_v3); return its canonical JSON form, the
    one stored, compared, exported and loaded by gateways.

    Raises:
        PolicyInvalid: not a valid document, larger than `MAX_DOCUMENT_BYTES` or with more
            than `MAX_STATEMENTS` statements; ``problems`` name the location of each.
    """
    if isinstance(raw, Policy):
        model = raw
    else:
        try:
            model = Policy.model_validate(raw)
        except ValidationError as exc:
            problems = [f"{source}: {problem.message}" for problem in problems_of(exc, Policy)]
            raise PolicyInvalid(problems[0], problems=problems) from None
    document: dict[str, Any] = model.model_dump(mode="json")
    count = statement_count(document)
    if count > MAX_STATEMENTS:
        raise PolicyInvalid(
            f"{source}: the document has {count} statements; at most {MAX_STATEMENTS} are accepted"
        )
    size = len(canonical_json(document).encode())
    if size > MAX_DOCUMENT_BYTES:
        raise PolicyInvalid(
            f"{source}: the document is {size} bytes as canonical JSON; "
            f"at most {MAX_DOCUMENT_BYTES} are accepted"
        )
    return document


def check_attributes(values: Mapping[str, str]) -> dict[str, str]:
    """Attributes to set, checked: keys of `KEY_RULE`, values of 1-`MAX_VALUE_CHARS`
    characters without control characters; ``model``, ``site`` and ``line`` stricter."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not re.fullmatch(KEY_PATTERN, key):
            raise PolicyInvalid(f"attribute key {str(key)[:80]!r}: must be {KEY_RULE}")
        if not isinstance(value, str) or not value:
            raise PolicyInvalid(f"attribute {key}: the value must be a non-empty string")
        if len(value) > MAX_VALUE_CHARS:
            raise PolicyInvalid(
                f"attribute {key}: the value is {len(value)} characters; "
                f"at most {MAX_VALUE_CHARS} are accepted"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise PolicyInvalid(f"attribute {key}: the value holds a control character")
        if key in WELL_KNOWN_KEYS and not _WELL_KNOWN_VALUE.fullmatch(value):
            raise PolicyInvalid(f"attribute {key}: the value must be {_WELL_KNOWN_RULE}")
        out[key] = value
    if len(out) > MAX_ATTRIBUTES:
        raise PolicyInvalid(f"{len(out)} attributes given; a device has at most {MAX_ATTRIBUTES}")
    return out


def bounded_diff(
    before: str, after: str, *, label: str, limit: int = MAX_DIFF_CHARS
) -> tuple[str, bool]:
    """A unified diff of two canonical texts, cut at ``limit`` characters (and whether it
    was)."""
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"{label} (before)",
        tofile=f"{label} (after)",
        n=2,
    )
    text = "".join(lines)
    if len(text) <= limit:
        return text, False
    return text[:limit], True


def sha256_of(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


# --- events ----------------------------------------------------------------------------


async def _event(
    conn: Connection,
    *,
    actor: str,
    instance: str,
    action: str,
    version: int,
    device_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    await eventlog.append_event(
        conn,
        instance=instance,
        type=EventType.POLICY,
        outcome=Outcome.ALLOWED,
        reason=Reason.ADMIN_ACTION,
        device_id=device_id,
        detail={"actor": actor, "action": action, "policy_version": version, **(detail or {})},
    )


async def record_refusal(
    conn: Connection,
    error: DevicegateError,
    *,
    actor: str,
    instance: str,
    action: str,
    device_id: str | None = None,
) -> None:
    """One denied ``policy`` event for a refused change (its own transaction)."""
    problems = getattr(error, "problems", None) or (str(error),)
    async with conn.transaction():
        await eventlog.append_event(
            conn,
            instance=instance,
            type=EventType.POLICY,
            outcome=Outcome.DENIED,
            reason=error.reason,
            device_id=device_id if device_id and _DEVICE_PATTERN.fullmatch(device_id) else None,
            detail={
                "actor": actor,
                "action": action,
                "error": str(error)[:500],
                "problems": [p[:300] for p in problems[:10]],
            },
        )


async def _begin_change(conn: Connection) -> None:
    """Hold the chain head (see the module's lock order) before reading what changes."""
    await eventlog.lock_head(conn)


async def _bump(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT devicegate_policy_bump()"))


async def current_version(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT version FROM policy_version"))


# --- policies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `apply_policies` did: ``changed`` names the policies that got a new revision
    (empty: every document was already current), ``attached`` the new attachments
    ``(policy, kind, target)``; ``version`` is the version now in force."""

    version: int
    changed: tuple[str, ...] = ()
    attached: tuple[tuple[str, str, str], ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def any_change(self) -> bool:
        return bool(self.changed or self.attached)


@dataclass(frozen=True, slots=True)
class PolicyRevision:
    name: str
    version: int
    created_at: datetime
    actor: str
    sha256: str | None
    deleted: bool


async def current_document(conn: Connection, name: str) -> dict[str, Any] | None:
    """The current document of ``name`` (None: never written, or deleted)."""
    value = await conn.fetchval(
        "SELECT document FROM policies WHERE name = $1 ORDER BY version DESC LIMIT 1", name
    )
    if value is None:
        return None
    parsed: dict[str, Any] = json.loads(value)
    return parsed


async def policy_names(conn: Connection) -> list[str]:
    rows = await conn.fetch(
        """SELECT name FROM (SELECT DISTINCT ON (name) name, document FROM policies
                             ORDER BY name, version DESC) AS c
           WHERE document IS NOT NULL ORDER BY name"""
    )
    return [row["name"] for row in rows]


async def _check_target_exists(conn: Connection, kind: str, target: str) -> None:
    if kind == "group":
        if not await conn.fetchval("SELECT true FROM device_groups WHERE name = $1", target):
            raise NotFound(f"unknown group {target!r}")
    elif kind == "device":
        found = await conn.fetchval(
            "SELECT true FROM devices WHERE device_id = $1 FOR KEY SHARE", target
        )
        if not found:
            raise NotFound(f"unknown device {target!r}")


async def apply_policies(
    conn: Connection,
    documents: Mapping[str, Mapping[str, Any]],
    *,
    actor: str,
    instance: str,
    attach: Iterable[tuple[str, str, str]] = (),
) -> ApplyResult:
    """Store each of ``documents`` (name -> canonical document, `canonical_document`) as
    the current revision of its name, and add the attachments ``(policy, kind, target)``:
    one transaction, one version, one event (with a diff per changed policy). Nothing
    changes (no version, no event) when every document is current and every attachment
    exists. An attachment may name a policy of ``documents`` or one already stored.

    Raises:
        PolicyInvalid: a bad name or target, or too many policies.
        NotFound: an attachment's policy, group or device that does not exist.
    """
    if not documents and not attach:
        raise PolicyInvalid("nothing to apply: no policy and no attachment")
    texts = {check_name(name): canonical_json(doc) for name, doc in documents.items()}
    targets = tuple(
        dict.fromkeys(
            (check_name(name), *check_target(kind, target)) for name, kind, target in attach
        )
    )
    async with conn.transaction():
        for kind, target in sorted({(k, t) for _, k, t in targets}):
            await _check_target_exists(conn, kind, target)
        await _begin_change(conn)
        names = set(await policy_names(conn))
        if len(names | set(texts)) > MAX_POLICIES:
            raise PolicyInvalid(f"at most {MAX_POLICIES} policies may exist")
        for name, _, _ in targets:
            if name not in texts and name not in names:
                raise NotFound(f"unknown policy {name!r}")
        befores = {name: await current_document(conn, name) for name in texts}
        changed = [
            name
            for name, text in texts.items()
            if befores[name] is None or canonical_json(befores[name] or {}) != text
        ]
        rows = await conn.fetch(
            """SELECT policy_name, target_kind, target FROM policy_attachments
               JOIN unnest($1::text[], $2::text[], $3::text[]) AS t(p, k, v)
                 ON policy_name = t.p AND target_kind = t.k AND target = t.v""",
            [t[0] for t in targets],
            [t[1] for t in targets],
            [t[2] for t in targets],
        )
        existing = {(r["policy_name"], r["target_kind"], r["target"]) for r in rows}
        new_targets = tuple(t for t in targets if t not in existing)
        unchanged = tuple(name for name in texts if name not in changed)
        if not changed and not new_targets:
            return ApplyResult(await current_version(conn), unchanged=unchanged)
        version = await _bump(conn)
        budget = MAX_DIFF_CHARS
        details: list[dict[str, Any]] = []
        for name in changed:
            before, text = befores[name], texts[name]
            digest = hashlib.sha256(text.encode()).hexdigest()
            await conn.execute(
                """INSERT INTO policies (name, version, document, sha256, actor)
                   VALUES ($1, $2, $3::jsonb, $4, $5)""",
                name, version, text, digest, actor,
            )  # fmt: skip
            diff, cut = bounded_diff(
                "" if before is None else canonical_json(before), text, label=name,
                limit=budget,
            )  # fmt: skip
            budget = max(0, budget - len(diff))
            details.append(
                {"name": name, "created": before is None, "sha256": digest, "diff": diff,
                 "diff_truncated": cut}
            )  # fmt: skip
        for name, kind, target in new_targets:
            await _attach_row(conn, name, kind, target, actor)
        detail: dict[str, Any] = {"policies": details}
        if new_targets:
            detail["attached"] = [
                f"{name} -> {kind}:{target}" for name, kind, target in new_targets
            ]
        await _event(
            conn, actor=actor, instance=instance, action="policy_apply", version=version,
            detail=detail,
        )  # fmt: skip
    return ApplyResult(version, tuple(changed), new_targets, unchanged)


async def delete_policy(conn: Connection, name: str, *, actor: str, instance: str) -> int:
    """Delete a policy (its history stays) and its attachments; returns the new version."""
    check_name(name)
    async with conn.transaction():
        await _begin_change(conn)
        before = await current_document(conn, name)
        if before is None:
            raise NotFound(f"unknown policy {name!r}")
        version = await _bump(conn)
        await conn.execute(
            "INSERT INTO policies (name, version, document, actor) VALUES ($1, $2, NULL, $3)",
            name,
            version,
            actor,
        )
        detached = await conn.fetch(
            "DELETE FROM policy_attachments WHERE policy_name = $1 RETURNING target_kind, target",
            name,
        )
        diff, cut = bounded_diff(canonical_json(before), "", label=name)
        await _event(
            conn, actor=actor, instance=instance, action="policy_delete", version=version,
            detail={
                "name": name, "diff": diff, "diff_truncated": cut,
                "detached": sorted(f"{r['target_kind']}:{r['target']}" for r in detached),
            },
        )  # fmt: skip
    return version


async def history(
    conn: Connection, name: str | None = None, *, limit: int = 100
) -> list[PolicyRevision]:
    """Revisions, newest first."""
    rows = await conn.fetch(
        """SELECT name, version, created_at, actor, sha256, document IS NULL AS deleted
           FROM policies WHERE $1::text IS NULL OR name = $1
           ORDER BY version DESC, name LIMIT $2""",
        name,
        limit,
    )
    return [PolicyRevision(**dict(row)) for row in rows]


async def _attach_row(conn: Connection, name: str, kind: str, target: str, actor: str) -> None:
    await conn.execute(
        """INSERT INTO policy_attachments (policy_name, target_kind, target, actor)
           VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING""",
        name,
        kind,
        target,
        actor,
    )


async def attach(
    conn: Connection, name: str, kind: str, target: str, *, actor: str, instance: str
) -> int | None:
    """Attach policy ``name`` to a target; the new version, or None if it already was.

    Raises:
        NotFound: no such policy, group or device.
    """
    check_name(name)
    check_target(kind, target)
    async with conn.transaction():
        await _check_target_exists(conn, kind, target)
        await _begin_change(conn)
        if await current_document(conn, name) is None:
            raise NotFound(f"unknown policy {name!r}")
        exists = await conn.fetchval(
            """SELECT true FROM policy_attachments
               WHERE policy_name = $1 AND target_kind = $2 AND target = $3""",
            name,
            kind,
            target,
        )
        if exists:
            return None
        version = await _bump(conn)
        await _attach_row(conn, name, kind, target, actor)
        await _event(
            conn, actor=actor, instance=instance, action="policy_attach", version=version,
            device_id=target if kind == "device" else None,
            detail={"name": name, "diff": {"added": [f"{kind}:{target}"]}},
        )  # fmt: skip
    return version


async def detach(
    conn: Connection, name: str, kind: str, target: str, *, actor: str, instance: str
) -> int | None:
    """Detach policy ``name`` from a target; the new version, or None if it was not."""
    check_name(name)
    check_target(kind, target)
    async with conn.transaction():
        await _begin_change(conn)
        gone = await conn.fetchval(
            """DELETE FROM policy_attachments
               WHERE policy_name = $1 AND target_kind = $2 AND target = $3 RETURNING true""",
            name,
            kind,
            target,
        )
        if not gone:
            return None
        version = await _bump(conn)
        await _event(
            conn, actor=actor, instance=instance, action="policy_detach", version=version,
            device_id=target if kind == "device" else None,
            detail={"name": name, "diff": {"removed": [f"{kind}:{target}"]}},
        )  # fmt: skip
    return version


async def attachments(conn: Connection, name: str | None = None) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        """SELECT policy_name, target_kind, target FROM policy_attachments
           WHERE $1::text IS NULL OR policy_name = $1 ORDER BY 1, 2, 3""",
        name,
    )
    return [(row[0], row[1], row[2]) for row in rows]


# --- device attributes -----------------------------------------------------------------


async def _lock_device(conn: Connection, device_id: str) -> None:
    check_device_id(device_id)
    if not await conn.fetchval(
        "SELECT true FROM devices WHERE device_id = $1 FOR KEY SHARE", device_id
    ):
        raise NotFound(f"unknown device {device_id!r}")


async def get_attributes(conn: Connection, device_id: str) -> dict[str, str]:
    """A device's attributes (NotFound for an unknown device)."""
    check_device_id(device_id)
    if not await conn.fetchval("SELECT true FROM devices WHERE device_id = $1", device_id):
        raise NotFound(f"unknown device {device_id!r}")
    rows = await conn.fetch(
        "SELECT key, value FROM device_attributes WHERE device_id = $1 ORDER BY key", device_id
    )
    return {row["key"]: row["value"] for row in rows}


async def _write_attributes(conn: Connection, device_id: str, values: Mapping[str, str]) -> None:
    await conn.execute(
        """INSERT INTO device_attributes (device_id, key, value)
           SELECT $1, k, v FROM unnest($2::text[], $3::text[]) AS a(k, v)
           ON CONFLICT (device_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
           WHERE device_attributes.value IS DISTINCT FROM EXCLUDED.value""",
        device_id,
        list(values),
        list(values.values()),
    )


async def set_attributes(
    conn: Connection,
    device_id: str,
    values: Mapping[str, str],
    *,
    unset: Iterable[str] = (),
    actor: str,
    instance: str,
) -> tuple[dict[str, str], int | None]:
    """Set (and unset) a device's attributes; returns them and the new version (None:
    nothing changed).

    Raises:
        PolicyInvalid: a bad key or value, or more than `MAX_ATTRIBUTES` in the end.
        NotFound: no such device.
    """
    wanted = check_attributes(values)
    removing = sorted(set(unset))
    for key in removing:
        if not re.fullmatch(KEY_PATTERN, key):
            raise PolicyInvalid(f"attribute key {key[:80]!r}: must be {KEY_RULE}")
    async with conn.transaction():
        await _lock_device(conn, device_id)
        await _begin_change(conn)
        before = await get_attributes(conn, device_id)
        after = {k: v for k, v in before.items() if k not in removing} | wanted
        if len(after) > MAX_ATTRIBUTES:
            raise PolicyInvalid(
                f"device {device_id} would have {len(after)} attributes; "
                f"at most {MAX_ATTRIBUTES} are accepted"
            )
        if after == before:
            return before, None
        version = await _bump(conn)
        changed = {k: v for k, v in wanted.items() if before.get(k) != v}
        gone = [k for k in removing if k in before]
        if changed:
            await _write_attributes(conn, device_id, changed)
        if gone:
            await conn.execute(
                "DELETE FROM device_attributes WHERE device_id = $1 AND key = ANY($2::text[])",
                device_id,
                gone,
            )
        await _event(
            conn, actor=actor, instance=instance, action="attributes_set", version=version,
            device_id=device_id,
            detail={"diff": {
                "set": changed,
                "removed": {k: before[k] for k in gone},
                "replaced": {k: before[k] for k in changed if k in before},
            }},
        )  # fmt: skip
    return after, version


async def apply_enrollment_attributes(
    conn: Connection, device_id: str, attrs: Mapping[str, str]
) -> dict[str, str]:
    """Set attributes on a device being enrolled, inside the caller's enrollment
    transaction (its ``enroll`` event is the record: no event of its own). They overlay
    the fleet's and token's defaults, which the device row's insert applied already. The
    policy version is bumped at commit (schemas/sql/0009_policies.sql).

    Raises:
        PolicyInvalid: a bad key or value, or more than `MAX_ATTRIBUTES` in the end.
    """
    wanted = check_attributes(attrs)
    if wanted:
        await _write_attributes(conn, device_id, wanted)
        count = await conn.fetchval(
            "SELECT count(*) FROM device_attributes WHERE device_id = $1", device_id
        )
        if count > MAX_ATTRIBUTES:
            raise PolicyInvalid(f"at most {MAX_ATTRIBUTES} attributes per device")
    return wanted


async def set_fleet_defaults(
    conn: Connection, fleet: str, values: Mapping[str, str], *, actor: str, instance: str
) -> int | None:
    """Replace the default attributes a fleet's new devices receive (the fleet is created
    if new). Returns the new version, None when unchanged."""
    if not re.fullmatch(FLEET_PATTERN, fleet):
        raise PolicyInvalid(f"not a fleet name: {fleet[:80]!r}")
    wanted = check_attributes(values)
    async with conn.transaction():
        await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", fleet)
        await _begin_change(conn)
        before = json.loads(
            await conn.fetchval(
                "SELECT default_attributes FROM fleets WHERE name = $1 FOR UPDATE", fleet
            )
        )
        if before == wanted:
            return None
        version = await _bump(conn)
        await conn.execute(
            "UPDATE fleets SET default_attributes = $2::jsonb WHERE name = $1",
            fleet,
            json.dumps(wanted),
        )
        await _event(
            conn, actor=actor, instance=instance, action="fleet_defaults_set", version=version,
            detail={"fleet": fleet, "diff": {"before": before, "after": wanted}},
        )  # fmt: skip
    return version


async def fleet_defaults(conn: Connection, fleet: str) -> dict[str, str]:
    value = await conn.fetchval("SELECT default_attributes FROM fleets WHERE name = $1", fleet)
    if value is None:
        raise NotFound(f"unknown fleet {fleet!r}")
    parsed: dict[str, str] = json.loads(value)
    return parsed


# --- groups ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    description: str
    members: int
    created_at: datetime


async def list_groups(conn: Connection) -> list[GroupInfo]:
    rows = await conn.fetch(
        """SELECT g.name, g.description, g.created_at, count(m.device_id) AS members
           FROM device_groups g LEFT JOIN group_members m ON m.group_name = g.name
           GROUP BY g.name ORDER BY g.name"""
    )
    return [GroupInfo(**dict(row)) for row in rows]


async def group_members(conn: Connection, name: str) -> list[str]:
    check_name(name, "group name")
    if not await conn.fetchval("SELECT true FROM device_groups WHERE name = $1", name):
        raise NotFound(f"unknown group {name!r}")
    rows = await conn.fetch(
        "SELECT device_id FROM group_members WHERE group_name = $1 ORDER BY device_id", name
    )
    return [row["device_id"] for row in rows]


async def groups_of(conn: Connection, device_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT group_name FROM group_members WHERE device_id = $1 ORDER BY 1", device_id
    )
    return [row["group_name"] for row in rows]


async def create_group(
    conn: Connection, name: str, description: str = "", *, actor: str, instance: str
) -> int:
    check_name(name, "group name")
    if len(description) > 500:
        raise PolicyInvalid("a group description has at most 500 characters")
    async with conn.transaction():
        await _begin_change(conn)
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO device_groups (name, description) VALUES ($1, $2)",
                    name,
                    description,
                )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"group {name!r} exists") from None
        version = await _bump(conn)
        await _event(
            conn, actor=actor, instance=instance, action="group_create", version=version,
            detail={"group": name, "description": description},
        )  # fmt: skip
    return version


async def delete_group(conn: Connection, name: str, *, actor: str, instance: str) -> int:
    """Delete a group, its memberships and the policy attachments to it."""
    check_name(name, "group name")
    async with conn.transaction():
        await _begin_change(conn)
        members = await conn.fetch(
            "SELECT device_id FROM group_members WHERE group_name = $1 ORDER BY 1", name
        )
        deleted = await conn.fetchval(
            "DELETE FROM device_groups WHERE name = $1 RETURNING true", name
        )
        if not deleted:
            raise NotFound(f"unknown group {name!r}")
        detached = await conn.fetch(
            """DELETE FROM policy_attachments WHERE target_kind = 'group' AND target = $1
               RETURNING policy_name""",
            name,
        )
        version = await _bump(conn)
        await _event(
            conn, actor=actor, instance=instance, action="group_delete", version=version,
            detail={
                "group": name,
                "diff": {"removed_members": [r["device_id"] for r in members][:100],
                         "detached_policies": sorted(r["policy_name"] for r in detached)},
            },
        )  # fmt: skip
    return version


async def change_members(
    conn: Connection,
    name: str,
    device_ids: Sequence[str],
    *,
    add: bool,
    actor: str,
    instance: str,
) -> tuple[list[str], int | None]:
    """Add devices to (or remove them from) a group; returns the devices whose membership
    changed and the new version (None: none changed).

    Raises:
        NotFound: no such group, or (adding) an unknown device.
        PolicyInvalid: more than `MAX_MEMBERS` devices, or a device in too many groups.
    """
    check_name(name, "group name")
    devices = sorted(set(device_ids))
    if not devices:
        raise PolicyInvalid("name at least one device")
    if len(devices) > MAX_MEMBERS:
        raise PolicyInvalid(f"at most {MAX_MEMBERS} devices per request")
    for device_id in devices:
        check_device_id(device_id)
    async with conn.transaction():
        if add:
            found = await conn.fetch(
                """SELECT device_id FROM devices WHERE device_id = ANY($1::text[])
                   ORDER BY device_id FOR KEY SHARE""",
                devices,
            )
            missing = sorted(set(devices) - {row["device_id"] for row in found})
            if missing:
                raise NotFound(f"unknown device {missing[0]!r}")
        await _begin_change(conn)
        if not await conn.fetchval("SELECT true FROM device_groups WHERE name = $1", name):
            raise NotFound(f"unknown group {name!r}")
        if add:
            rows = await conn.fetch(
                """INSERT INTO group_members (group_name, device_id)
                   SELECT $1, d FROM unnest($2::text[]) AS d ON CONFLICT DO NOTHING
                   RETURNING device_id""",
                name,
                devices,
            )
            crowded = await conn.fetchval(
                """SELECT device_id FROM group_members WHERE device_id = ANY($1::text[])
                   GROUP BY device_id HAVING count(*) > $2 LIMIT 1""",
                devices,
                MAX_GROUPS_PER_DEVICE,
            )
            if crowded is not None:
                raise PolicyInvalid(
                    f"device {crowded} would be in more than {MAX_GROUPS_PER_DEVICE} groups"
                )
        else:
            rows = await conn.fetch(
                """DELETE FROM group_members WHERE group_name = $1
                   AND device_id = ANY($2::text[]) RETURNING device_id""",
                name,
                devices,
            )
        changed = sorted(row["device_id"] for row in rows)
        if not changed:
            return [], None
        version = await _bump(conn)
        await _event(
            conn, actor=actor, instance=instance,
            action="group_add" if add else "group_remove", version=version,
            device_id=changed[0] if len(changed) == 1 else None,
            detail={"group": name, "diff": {"added" if add else "removed": changed[:100]},
                    "count": len(changed)},
        )  # fmt: skip
    return changed, version
