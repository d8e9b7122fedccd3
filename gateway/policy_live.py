"""The policy as a gateway worker holds it: one immutable `PolicyState` per policy version.

A worker holds exactly one `PolicyState` at a time and swaps it whole (`Gateway.policy_changed`);
a session holds the `gateway.policy.CompiledPolicy` compiled for its device from the state
it was judged by, and is re-judged when a newer state arrives
(`gateway.connection.Session.rejudge`).

Invariants:

* Pure: no I/O, no clock. `PolicyState.for_identity` compiles a device's policy once per
  (version, device), and not at all when the new version changed nothing the device's
  policy is made of (`PolicyState.carry_over`): a change to one fleet's policy recompiles
  and re-judges that fleet's devices only. A PUBLISH costs a dictionary lookup in the
  session's own decision cache, as before.
* `UNLOADED` is the state of a worker whose policy source is the database and that has not
  loaded a snapshot yet: its sessions get `NO_POLICY`, and every CONNECT is refused
  (``policy_not_loaded``), fail closed.
* A database in which no policy was ever written (version 0) gives the built-in default
  policy, the same as a gateway without a policy file.
"""

from __future__ import annotations

import hashlib
from typing import Final, Protocol

from gateway.identity import DeviceIdentity
from gateway.policy import DEFAULT_DENY, Action, Decision, PolicySet
from schemas.events import Reason
from schemas.policy import PolicyDocument, PolicyFile
from schemas.policy_store import PolicySnapshot

__all__ = [
    "DEFAULT_DENY",
    "NO_POLICY",
    "UNLOADED",
    "NoPolicy",
    "PolicyState",
    "SessionPolicy",
    "judges_deliveries",
    "state_from_document",
    "state_from_snapshot",
]


_CACHE_LIMIT: Final = 200_000  # devices per state (a worker holds about 10,000 sessions)


class SessionPolicy(Protocol):
    """What a session asks its compiled policy (`gateway.policy.CompiledPolicy` fits)."""

    @property
    def version(self) -> int: ...

    @property
    def publish_flags_matter(self) -> bool: ...

    @property
    def drop_denied_publish_v3(self) -> bool: ...

    def decide(
        self, action: Action, topic_or_filter: str, *, qos: int = 0, retain: bool = False
    ) -> Decision: ...

    def client_id_allowed(self, client_id: str) -> bool: ...


def judges_deliveries(policy: SessionPolicy) -> bool:
    """Whether some statement of ``policy`` names ``receive``: only then are deliveries
    (broker to device) judged at all."""
    statements = getattr(policy, "statements", ())
    return any(Action.RECEIVE in s.statement.actions for s in statements)


class NoPolicy:
    """The `SessionPolicy` while no policy is loaded: nothing is allowed (the session
    refuses its CONNECT with ``policy_not_loaded`` before asking)."""

    __slots__ = ()

    version: Final = -1
    publish_flags_matter: Final = False
    drop_denied_publish_v3: Final = False

    def decide(
        self, action: Action, topic_or_filter: str, *, qos: int = 0, retain: bool = False
    ) -> Decision:
        return Decision(False, Reason.POLICY_NOT_LOADED, None, self.version)

    def client_id_allowed(self, client_id: str) -> bool:
        return False


NO_POLICY: Final = NoPolicy()


Fingerprint = tuple[tuple[str, frozenset[str], str], ...]
"""What a device's compiled policy is made of: each applicable policy, the groups it
applies through, and the digest of its document."""


def _digests(policies: PolicySet) -> dict[str, str]:
    return {
        name: hashlib.sha256(policy.model_dump_json().encode()).hexdigest()
        for name, policy in policies.document.policies.items()
    }


class PolicyState:
    """One version of the whole policy, as loaded (from the file or the database).

    `carry_over` links a new state to the one it replaces: a device whose subject (id,
    fleet, groups, attributes, certificate) and applicable policy documents are the same in
    both keeps its compiled policy, so a change recompiles and re-judges only the devices
    it concerns. Such a compiled policy (and its decisions and events) names the version
    that last changed the device's policy, not the newest.
    """

    __slots__ = ("_compiled", "_digests", "_previous", "loaded", "policies", "source", "version")

    def __init__(self, policies: PolicySet | None, *, source: str) -> None:
        self.policies = policies
        self.version = policies.version if policies is not None else -1
        self.source = source  # "file", "database" or "unloaded": logs
        self.loaded = policies is not None
        self._digests = _digests(policies) if policies is not None else {}
        self._compiled: dict[tuple[object, ...], tuple[Fingerprint, SessionPolicy]] = {}
        self._previous: PolicyState | None = None

    def carry_over(self, previous: PolicyState) -> None:
        """Reuse ``previous``'s compilations where nothing they depend on changed."""
        if previous is not self and previous.loaded:
            previous._previous = None  # one generation back only: no chain of old states
            self._previous = previous

    def for_identity(self, identity: DeviceIdentity, *, trust_domain: str) -> SessionPolicy:
        """The compiled policy of ``identity`` under this version (cached per device)."""
        policies = self.policies
        if policies is None:
            return NO_POLICY
        spiffe_id = f"spiffe://{trust_domain}/fleet/{identity.fleet}/device/{identity.device_id}"
        subject = policies.subject(identity, cert_serial=identity.serial, spiffe_id=spiffe_id)
        key = subject.key()
        known = self._compiled.get(key)
        if known is not None:
            return known[1]
        digests = self._digests
        fingerprint = tuple(
            (name, via, digests.get(name, "")) for name, via in policies.applicable(subject)
        )
        previous = self._previous._compiled.get(key) if self._previous is not None else None
        if previous is not None and previous[0] == fingerprint:
            compiled = previous[1]
        else:
            compiled = policies.for_subject(subject)
        if len(self._compiled) >= _CACHE_LIMIT:
            self._compiled.clear()
        self._compiled[key] = (fingerprint, compiled)
        return compiled


def state_from_document(
    document: PolicyDocument | PolicyFile | PolicySet, *, version: int = 0
) -> PolicyState:
    """The state of a policy file (version 0 at start; SIGHUP counts up locally)."""
    if isinstance(document, PolicySet):
        return PolicyState(document, source="file")
    return PolicyState(PolicySet.from_document(document, version), source="file")


def state_from_snapshot(snapshot: PolicySnapshot) -> PolicyState:
    """The state of the database's snapshot (`schemas.policy_store.load_policy_snapshot`).

    Raises:
        gateway.policy.PolicyError: a stored document does not validate (the follower
            keeps the version it has and retries).
    """
    return PolicyState(PolicySet.from_snapshot(snapshot), source="database")


UNLOADED: Final = PolicyState(None, source="unloaded")
