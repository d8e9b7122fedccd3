"""The control plane's door to ``gateway.policy``: read policy files, explain decisions.

The one module below the surfaces that imports ``gateway.policy`` (and nothing else of the
gateway): a file is validated, and a decision explained, by the gateway's own code over
the same snapshot the gateway loads (`schemas.policy_store.load_policy_snapshot`, turned
into decisions by ``PolicySet.from_snapshot``), never by a copy of the rules. The CLI
(``devicegate policy apply|explain``), the admin API (``PUT /v1/policies/{name}``,
``POST /v1/policy/explain``) and the console's device page call it.

A database that holds no policy document decides with the built-in default policy (as a
gateway without a policy file does), with the groups and attributes it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.policy import Action, PolicyError, PolicySet, Subject, explain, load_policy
from provisioning import policies, store
from provisioning.errors import NotFound, RequestInvalid
from schemas.policy import Policy, PolicyDocument, PolicyFile
from schemas.policy_store import PolicySnapshot, load_policy_snapshot

Connection = Any

ACTIONS: Final = tuple(action.value for action in Action)
MAX_FILE_BYTES: Final = 4 * policies.MAX_DOCUMENT_BYTES
MAX_FILE_POLICIES: Final = 100


@dataclass(frozen=True, slots=True)
class PolicyFileContent:
    """A policy file as `provisioning.policies.apply_policies` takes it."""

    documents: dict[str, dict[str, Any]]
    attach: tuple[tuple[str, str, str], ...]


def _checked_filters(documents: dict[str, dict[str, Any]]) -> None:
    """Every topic resource must expand to a valid filter (the gateway's own check)."""
    try:
        PolicySet(
            PolicyFile(
                policies={name: Policy.model_validate(doc) for name, doc in documents.items()}
            )
        )
    except PolicyError as exc:
        raise policies.PolicyInvalid(exc.problems[0], problems=exc.problems) from None


def load_document_file(path: Path) -> PolicyFileContent:
    """A policy file (TOML, or JSON for ``.json``; the statement format or the per-fleet
    format of earlier releases, converted) as canonical documents and attachments.

    Raises:
        policies.PolicyInvalid: unreadable, too large, or invalid; ``problems`` holds one
            ``FILE[:LINE]: sentence`` per problem.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        why = exc.strerror
        raise policies.PolicyInvalid(f"{path}: cannot read the policy file: {why}") from None
    if size > MAX_FILE_BYTES:
        raise policies.PolicyInvalid(
            f"{path}: the file is {size} bytes; at most {MAX_FILE_BYTES} are read"
        )
    try:
        loaded = load_policy(path)
        PolicySet.from_document(loaded)
    except PolicyError as exc:
        raise policies.PolicyInvalid(exc.problems[0], problems=exc.problems) from None
    document = loaded.to_policy_file() if isinstance(loaded, PolicyDocument) else loaded
    if len(document.policies) > MAX_FILE_POLICIES:
        raise policies.PolicyInvalid(
            f"{path}: {len(document.policies)} policies; at most {MAX_FILE_POLICIES} per file"
        )
    documents = {
        name: policies.canonical_document(policy, source=f"{path}: policies.{name}")
        for name, policy in document.policies.items()
    }
    attach = tuple((a.policy, a.kind, a.target) for a in document.attach)
    return PolicyFileContent(documents, attach)


def file_of(
    documents: dict[str, dict[str, Any]], attachments: list[tuple[str, str, str]]
) -> dict[str, Any]:
    """Stored documents and attachments as a policy file (``policy export``): what
    `load_document_file` reads back to the same documents and attachments."""
    attach = [{"policy": name, kind: target} for name, kind, target in attachments]
    return {"policies": documents, "attach": attach}


def check_document(raw: object, *, name: str) -> dict[str, Any]:
    """A document from the API (parsed JSON) as its canonical form, validated as a file is.

    Raises:
        policies.PolicyInvalid: what is wrong, with its location in the document.
    """
    document = policies.canonical_document(raw, source="document")
    _checked_filters({name: document})
    return document


@dataclass(frozen=True, slots=True)
class Explained:
    """A decision and where it came from.

    Attributes:
        allowed: The decision.
        statement: ``<policy>/<id>`` that decided; ``default-deny`` when none matched.
        version: The global policy version decided on.
        why: The reason in words, and notes (resources left out for this device).
    """

    device_id: str
    fleet: str
    action: str
    topic: str
    allowed: bool
    statement: str
    version: int
    why: str
    policies: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "fleet": self.fleet,
            "action": self.action,
            "topic": self.topic,
            "decision": "allowed" if self.allowed else "denied",
            "statement": self.statement,
            "policy_version": self.version,
            "policies": list(self.policies),
            "why": self.why,
            "notes": list(self.notes),
            "groups": list(self.groups),
        }


def policy_set_of(snapshot: PolicySnapshot) -> PolicySet:
    """The decisions of a snapshot (no document: the built-in default policy).

    Raises:
        RequestInvalid: a stored document no longer loads.
    """
    try:
        return PolicySet.from_snapshot(snapshot)
    except PolicyError as exc:
        raise RequestInvalid(f"the stored policy does not load: {exc.problems[0]}") from None


def explain_in(
    policy_set: PolicySet,
    subject: Subject,
    *,
    action: str,
    topic: str,
    qos: int = 0,
    retain: bool = False,
) -> Explained:
    """The decision for one request of ``subject`` (pure)."""
    if action not in ACTIONS:
        raise RequestInvalid(f"action must be one of {', '.join(ACTIONS)}")
    compiled = policy_set.for_subject(subject)
    explained = explain(compiled, Action(action), topic, qos, retain)
    return Explained(
        device_id=subject.device_id,
        fleet=subject.fleet,
        action=action,
        topic=topic,
        allowed=explained.allowed,
        statement=explained.statement,
        version=explained.version,
        why=explained.why,
        policies=tuple(name for name, _ in policy_set.applicable(subject)),
        groups=tuple(sorted(subject.groups)),
        notes=explained.notes,
    )


async def subject_of(
    conn: Connection, snapshot: PolicySnapshot, device_id: str, *, trust_domain: str
) -> Subject:
    """The subject of an enrolled device as a gateway sees it: its fleet, the groups and
    attributes of ``snapshot``, its newest active certificate's serial, its SPIFFE id.

    Raises:
        NotFound: no such device.
    """
    try:
        device = await store.get_device(conn, device_id)
    except NotFound:
        raise NotFound(f"unknown device {device_id!r}") from None
    serial = await conn.fetchval(
        """SELECT serial FROM certificates WHERE device_id = $1 AND status = 'active'
           ORDER BY issued_at DESC LIMIT 1""",
        device_id,
    )
    return Subject(
        device_id=device.device_id,
        fleet=device.fleet,
        groups=snapshot.groups_of(device_id),
        attributes=snapshot.attributes_of(device_id),
        cert_serial=serial or "",
        spiffe_id=f"spiffe://{trust_domain}/fleet/{device.fleet}/device/{device.device_id}",
    )


async def explain_device(
    conn: Connection,
    device_id: str,
    *,
    action: str,
    topic: str,
    qos: int = 0,
    retain: bool = False,
    trust_domain: str,
) -> Explained:
    """`explain_in` over the current snapshot, for an enrolled device.

    Raises:
        NotFound: no such device.
        RequestInvalid: an unknown action.
    """
    if action not in ACTIONS:
        raise RequestInvalid(f"action must be one of {', '.join(ACTIONS)}")
    snapshot = await load_policy_snapshot(conn)
    subject = await subject_of(conn, snapshot, device_id, trust_domain=trust_domain)
    return explain_in(
        policy_set_of(snapshot), subject, action=action, topic=topic, qos=qos, retain=retain
    )
