"""The policy as a gateway worker holds it: one immutable `PolicyState` per policy version.

A worker holds exactly one `PolicyState` at a time and swaps it whole (`Gateway.policy_changed`);
a session holds the `SessionPolicy` compiled for its device from the state it was judged
by, and is re-judged when a newer state arrives (`gateway.connection.Session.rejudge`).

Invariants:

* Pure: no I/O, no clock. `PolicyState.for_identity` compiles a device's policy once per
  (version, device, certificate) and caches it, so a burst of sessions of one device, or a
  re-judgement of 10,000 sessions, costs one compilation per device; a PUBLISH costs a
  dictionary lookup in the session's own decision cache, as before.
* `UNLOADED` is the state of a worker whose policy source is the database and that has not
  loaded a snapshot yet: every CONNECT is refused (``policy_not_loaded``), fail closed.
* This module is the one seam between the gateway and the policy model: the file format's
  per-fleet templates are adapted here (`FleetRules`), so the switch to the statement model
  (``gateway.policy.PolicySet``) is one constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.identity import DeviceIdentity
from gateway.policy import Action, authorize, client_id_allowed
from schemas.events import Reason
from schemas.policy import FleetPolicy, PolicyDocument
from schemas.policy_store import PolicySnapshot

__all__ = [
    "DEFAULT_DENY",
    "NO_POLICY",
    "UNLOADED",
    "FleetRules",
    "NoPolicy",
    "PolicyState",
    "SessionPolicy",
    "Verdict",
    "state_from_document",
    "state_from_snapshot",
]

DEFAULT_DENY: Final = "default-deny"
"""The statement a denial names when no statement matched."""
_CACHE_LIMIT: Final = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision, with what events name: the statement and the policy version."""

    allowed: bool
    reason: Reason
    statement: str | None
    version: int


class SessionPolicy(Protocol):
    """What a session asks its compiled policy (`gateway.connection.Session`)."""

    @property
    def version(self) -> int: ...

    @property
    def receives(self) -> bool:
        """Whether deliveries (broker to device) are judged: some statement names receive."""
        ...

    @property
    def drop_denied_publish_v3(self) -> bool: ...

    def decide(self, action: Action, topic: str, *, qos: int = 0, retain: bool = False) -> Verdict:
        """The verdict on one PUBLISH topic, SUBSCRIBE filter or delivery."""
        ...

    def client_id_allowed(self, client_id: str) -> bool: ...


class FleetRules:
    """`SessionPolicy` of one device under a per-fleet template policy (the file format)."""

    __slots__ = ("_identity", "_policy", "version")

    receives: Final = False  # the file format has no receive rules: deliveries pass

    def __init__(self, identity: DeviceIdentity, policy: FleetPolicy, version: int = 0) -> None:
        self._identity = identity
        self._policy = policy
        self.version = version

    @property
    def drop_denied_publish_v3(self) -> bool:
        return self._policy.drop_denied_publish_v3

    def decide(self, action: Action, topic: str, *, qos: int = 0, retain: bool = False) -> Verdict:
        allowed = authorize(self._identity, action, topic, self._policy).allowed
        if allowed:
            return Verdict(True, Reason.OK, None, self.version)
        return Verdict(False, Reason.TOPIC_NOT_AUTHORIZED, DEFAULT_DENY, self.version)

    def client_id_allowed(self, client_id: str) -> bool:
        return client_id_allowed(self._identity, client_id, self._policy)


class NoPolicy:
    """The `SessionPolicy` while no policy is loaded: nothing is allowed (the session
    refuses its CONNECT with ``policy_not_loaded`` before asking)."""

    __slots__ = ()

    version: Final = -1
    receives: Final = False
    drop_denied_publish_v3: Final = False

    def decide(self, action: Action, topic: str, *, qos: int = 0, retain: bool = False) -> Verdict:
        return Verdict(False, Reason.POLICY_NOT_LOADED, None, self.version)

    def client_id_allowed(self, client_id: str) -> bool:
        return False


NO_POLICY: Final = NoPolicy()


class PolicyState:
    """One version of the whole policy, as loaded (from the file or the database)."""

    __slots__ = ("_cache", "_document", "attributes", "groups", "loaded", "source", "version")

    def __init__(
        self,
        document: PolicyDocument | None,
        *,
        version: int,
        source: str,
        groups: Mapping[str, frozenset[str]] | None = None,
        attributes: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self._document = document
        self.version = version
        self.source = source  # "file", "database" or "unloaded": logs and events
        self.loaded = document is not None
        self.groups = groups or {}
        self.attributes = attributes or {}
        self._cache: dict[tuple[str, str, str], SessionPolicy] = {}

    def for_identity(self, identity: DeviceIdentity) -> SessionPolicy:
        """The compiled policy of ``identity`` under this version (cached)."""
        if not self.loaded:
            return NO_POLICY
        key = (identity.device_id, identity.fleet, identity.serial)
        compiled = self._cache.get(key)
        if compiled is None:
            document = self._document if self._document is not None else PolicyDocument()
            compiled = FleetRules(identity, document.for_fleet(identity.fleet), self.version)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = compiled
        return compiled


def state_from_document(document: PolicyDocument, *, version: int = 0) -> PolicyState:
    """The state of a policy file (version 0: files are not versioned)."""
    return PolicyState(document, version=version, source="file")


def state_from_snapshot(snapshot: PolicySnapshot) -> PolicyState:
    """The state of the database's snapshot (`schemas.policy_store.load_policy_snapshot`).

    A database in which no policy was ever written (version 0) gives the built-in default
    policy, the same as a gateway without a policy file: switching the source to the
    database changes no decision until the first ``policy apply``.
    """
    if snapshot.version == 0 and not snapshot.documents:
        return PolicyState(PolicyDocument(), version=0, source="database")
    merged: dict[str, Any] = {"fleets": {}}
    for name in sorted(snapshot.documents):
        raw = snapshot.documents[name]
        if "default" in raw:
            merged["default"] = raw["default"]
        merged["fleets"].update(raw.get("fleets") or {})
    return PolicyState(
        PolicyDocument.model_validate(merged),
        version=snapshot.version,
        source="database",
        groups=snapshot.groups,
        attributes=snapshot.attributes,
    )


UNLOADED: Final = PolicyState(None, version=-1, source="unloaded")
