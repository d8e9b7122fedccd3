"""The control plane's door to ``gateway.policy``: read policy files, explain decisions.

The one module below the surfaces that imports ``gateway.policy`` (and nothing else of the
gateway): a file is validated, and a decision explained, by the gateway's own code over
the same snapshot the gateway loads (`schemas.policy_store.load_policy_snapshot`), never by
a copy of the rules. The CLI (``devicegate policy apply|explain``), the admin API
(``PUT /v1/policies/{name}``, ``POST /v1/policy/explain``) and the console's device page
call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.policy import Action, PolicyError, explain, load_policy
from provisioning import policies, store
from provisioning.errors import NotFound, RequestInvalid
from schemas.policy import PolicyDocument
from schemas.policy_store import PolicySnapshot, load_policy_snapshot

Connection = Any

ACTIONS: Final = ("publish", "subscribe")


MAX_FILE_BYTES: Final = 4 * policies.MAX_DOCUMENT_BYTES


def load_document_file(path: Path) -> dict[str, Any]:
    """A policy file (TOML, or JSON for ``.json``) as its canonical document.

    Raises:
        policies.PolicyInvalid: unreadable, too large, or invalid; ``problems`` holds one
            ``FILE[:LINE]: sentence`` per problem.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise policies.PolicyInvalid(
            f"{path}: cannot read the policy file: {exc.strerror}"
        ) from None
    if size > MAX_FILE_BYTES:
        raise policies.PolicyInvalid(
            f"{path}: the file is {size} bytes; at most {MAX_FILE_BYTES} are read"
        )
    try:
        document = load_policy(path)
    except PolicyError as exc:
        raise policies.PolicyInvalid(str(exc).splitlines()[0], problems=exc.problems) from None
    return policies.canonical_document(document.model_dump(mode="json"), source=str(path))


def check_document(raw: object) -> dict[str, Any]:
    """A document from the API (parsed JSON) as its canonical form, validated as a file is.

    Raises:
        policies.PolicyInvalid: what is wrong, with its location in the document.
    """
    return policies.canonical_document(raw, source="document")


@dataclass(frozen=True, slots=True)
class Explained:
    """A decision and where it came from.

    Attributes:
        allowed: The decision.
        statement: The statement (rule) that decided; ``default-deny`` when none matched.
        version: The global policy version decided on.
        policy: The policy document used (None: the built-in default).
        why: The reason in words.
    """

    device_id: str
    fleet: str
    action: str
    topic: str
    allowed: bool
    statement: str
    version: int
    policy: str | None
    why: str
    groups: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "fleet": self.fleet,
            "action": self.action,
            "topic": self.topic,
            "decision": "allowed" if self.allowed else "denied",
            "statement": self.statement,
            "policy_version": self.version,
            "policy": self.policy,
            "why": self.why,
            "groups": list(self.groups),
        }


@dataclass(frozen=True, slots=True)
class _Subject:
    device_id: str
    fleet: str


def _policy_for(
    snapshot: PolicySnapshot, device_id: str, fleet: str, groups: frozenset[str]
) -> tuple[str | None, PolicyDocument]:
    """The document that applies: attached to the device, else to one of its groups (by
    name), else to its fleet, else the policy named ``default``, else the built-in."""
    names = list(snapshot.attached_to("device", device_id))
    for group in sorted(groups):
        names += snapshot.attached_to("group", group)
    names += snapshot.attached_to("fleet", fleet)
    if "default" in snapshot.documents:
        names.append("default")
    for name in names:
        if name in snapshot.documents:
            return name, PolicyDocument.model_validate(dict(snapshot.documents[name]))
    return None, load_policy(None)


def explain_in(
    snapshot: PolicySnapshot,
    *,
    device_id: str,
    fleet: str,
    action: str,
    topic: str,
    qos: int = 0,
    retain: bool = False,
) -> Explained:
    """The decision for one request of a device over ``snapshot`` (pure)."""
    if action not in ACTIONS:
        raise RequestInvalid(f"action must be one of {', '.join(ACTIONS)}")
    groups = snapshot.groups_of(device_id)
    try:
        name, document = _policy_for(snapshot, device_id, fleet, groups)
    except (PolicyError, ValueError) as exc:
        raise RequestInvalid(f"the stored policy does not load: {exc}") from None
    verdict = explain(_Subject(device_id, fleet), Action(action), topic, document.for_fleet(fleet))
    return Explained(
        device_id=device_id,
        fleet=fleet,
        action=action,
        topic=topic,
        allowed=verdict.decision.allowed,
        statement=verdict.template or "default-deny",
        version=snapshot.version,
        policy=name,
        why=verdict.why,
        groups=tuple(sorted(groups)),
    )


async def explain_device(
    conn: Connection,
    device_id: str,
    *,
    action: str,
    topic: str,
    qos: int = 0,
    retain: bool = False,
) -> Explained:
    """`explain_in` over the current snapshot, for an enrolled device.

    Raises:
        NotFound: no such device.
        RequestInvalid: an unknown action.
    """
    if action not in ACTIONS:
        raise RequestInvalid(f"action must be one of {', '.join(ACTIONS)}")
    try:
        device = await store.get_device(conn, device_id)
    except NotFound:
        raise NotFound(f"unknown device {device_id!r}") from None
    snapshot = await load_policy_snapshot(conn)
    return explain_in(
        snapshot,
        device_id=device.device_id,
        fleet=device.fleet,
        action=action,
        topic=topic,
        qos=qos,
        retain=retain,
    )
