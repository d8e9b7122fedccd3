"""The policy evaluator: statements compiled per device, decisions with no I/O.

Invariants:

* Pure: a `CompiledPolicy` is immutable; the same request always gets the same
  `Decision`. No I/O, no clock. `PolicySet.for_subject` caches one per subject (bounded).
* Deny by default, and deny wins: a request is allowed only when an Allow statement
  covers it and no Deny statement does (both with their conditions met). The decision
  names the statement (``<policy>/<statement id>``, ``default-deny`` when none decided)
  and the policy version.
* PUBLISH, RETAIN, RECEIVE: the topic must match a filter. SUBSCRIBE (for
  ``$share/<group>/<filter>`` the inner filter): the filter must be contained in an
  Allow filter and must not intersect any Deny filter, since the broker would deliver the
  denied topics on it. A PUBLISH with the retain flag is also judged as RETAIN.
* Topics starting with ``$`` are reachable only through a resource naming them: a filter
  whose first level is a wildcard never matches them (`gateway.mqtt.topics`).
* Variables are substituted literally, never with ``str.format``. A value that is missing,
  empty, holds ``+``, ``#``, ``/`` or U+0000, or starts with ``$`` would widen (or move) a
  topic filter, so an Allow resource using it expands to nothing. A Deny resource fails
  closed instead: from the first level holding such a variable on, it becomes ``#``
  (and the literal substitution is denied too when it is a valid filter). For client id
  patterns the unsafe values are the missing, the empty and those holding U+0000; a
  Deny pattern then covers every id starting with the text before the variable.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from os.path import commonprefix
from typing import Final, Protocol

from pydantic import ValidationError

from gateway.mqtt.errors import InvalidTopic
from gateway.mqtt.topics import (
    filter_contains,
    filters_intersect,
    matches,
    parse_shared,
    validate_topic_filter,
)
from schemas.errors import DevicegateError
from schemas.events import Reason
from schemas.policy import (
    ANY_FLEET,
    Action,
    Attachment,
    Conditions,
    Effect,
    FleetPolicy,
    Policy,
    PolicyDocument,
    PolicyFile,
    Statement,
    problems_of,
    variables_of,
)

__all__ = [
    "ALLOWED",
    "DEFAULT_DENY",
    "DENIED",
    "CompiledPolicy",
    "CompiledStatement",
    "Decision",
    "PolicyError",
    "PolicySet",
    "Subject",
    "compile_for",
    "expand_resource",
    "upstream_client_id",
]

DEFAULT_DENY: Final = "default-deny"
_TOPIC_UNSAFE: Final = frozenset("+#/\x00")
_CLIENT_ID_UNSAFE: Final = frozenset("*\x00")
_VARIABLE: Final = re.compile(r"\{([^{}]*)\}")
_CACHE_SIZE: Final = 4096


class PolicyError(DevicegateError):
    """The policy file is missing, unreadable or invalid.

    Attributes:
        problems: One ``FILE[:LINE]: sentence`` per problem found.
    """

    def __init__(self, message: str, *, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict, the reason it is recorded under, the statement that decided it
    (``<policy>/<id>``; `DEFAULT_DENY` when none did) and the policy version."""

    allowed: bool
    reason: Reason
    statement: str | None = None
    version: int = 0


ALLOWED: Final = Decision(True, Reason.OK)
DENIED: Final = Decision(False, Reason.TOPIC_NOT_AUTHORIZED, DEFAULT_DENY)


@dataclass(frozen=True, slots=True)
class Subject:
    """What the policy needs to know about a device."""

    device_id: str
    fleet: str
    groups: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=dict)
    cert_serial: str = ""
    spiffe_id: str | None = None

    def key(self) -> tuple[object, ...]:
        """Everything a compiled policy depends on, hashable."""
        return (
            self.device_id,
            self.fleet,
            self.groups,
            tuple(sorted(self.attributes.items())),
            self.cert_serial,
            self.spiffe_id,
        )

    def value(self, name: str, group: str | None) -> str | None:
        """The value of variable ``name`` (None: the device has none)."""
        if name == "device_id":
            return self.device_id
        if name == "fleet":
            return self.fleet
        if name == "group":
            return group
        if name == "cert.serial":
            return self.cert_serial or None
        if name == "cert.spiffe_id":
            return self.spiffe_id
        if name.startswith("attr."):
            return self.attributes.get(name[5:])
        return None


class _Identity(Protocol):
    @property
    def device_id(self) -> str: ...

    @property
    def fleet(self) -> str: ...


def _topic_safe(value: str | None) -> bool:
    return value is not None and value[:1] not in ("", "$") and _TOPIC_UNSAFE.isdisjoint(value)


def _client_id_safe(value: str | None) -> bool:
    return value is not None and value != "" and _CLIENT_ID_UNSAFE.isdisjoint(value)


def _substitute(template: str, values: Mapping[str, str | None]) -> str:
    return _VARIABLE.sub(lambda m: values[m.group(1)] or "", template)


def expand_resource(
    template: str, subject: Subject, group: str | None = None, *, client_id: bool = False
) -> str | None:
    """``template`` with the subject's values, or None when a value is unsafe.

    For a topic resource the result is also a valid topic filter (else None).
    """
    names = variables_of(template)
    values = {name: subject.value(name, group) for name in names}
    safe = _client_id_safe if client_id else _topic_safe
    if not all(safe(v) for v in values.values()):
        return None
    expanded = _substitute(template, values)
    if not client_id:
        try:
            validate_topic_filter(expanded)
        except InvalidTopic:
            return None
    return expanded


def _fail_closed(template: str, subject: Subject, group: str | None) -> list[str]:
    """The filters a Deny topic resource covers when a value is unsafe (see module doc)."""
    levels = template.split("/")
    out = []
    for i, level in enumerate(levels):
        names = variables_of(level)
        if any(not _topic_safe(subject.value(n, group)) for n in names):
            out.append("/".join([*levels[:i], "#"]))
            break
    literal = _substitute(template, {n: subject.value(n, group) for n in variables_of(template)})
    try:
        validate_topic_filter(literal)
    except InvalidTopic:
        pass
    else:
        out.append(literal)
    return out


def _fail_closed_client_id(template: str) -> str:
    return template[: template.index("{")] + "*"


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A statement as it applies to one device: its resources expanded.

    Attributes:
        name: ``<policy>/<statement id>``.
        resources: ``(template, expanded)`` per resource that expands (per group for
            ``{group}``); a Deny's fail-closed filters are listed with their template.
        dropped: Allow resources that expand to nothing for this device.
    """

    name: str
    statement: Statement
    resources: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]

    @property
    def effect(self) -> Effect:
        return self.statement.effect

    @property
    def conditions(self) -> Conditions:
        return self.statement.conditions


def _compile_statement(
    name: str, statement: Statement, subject: Subject, via_groups: frozenset[str]
) -> CompiledStatement | None:
    if statement.groups:
        groups = subject.groups.intersection(statement.groups)
        if not groups:
            return None  # the statement is not about this device
    else:
        groups = via_groups
    connect = Action.CONNECT in statement.actions
    deny = statement.effect is Effect.DENY
    resources: list[tuple[str, str]] = []
    dropped: list[str] = []
    for template in statement.resources:
        uses_group = "group" in variables_of(template)
        for group in sorted(groups) if uses_group and groups else [None]:
            expanded = expand_resource(template, subject, group, client_id=connect)
            if expanded is not None:
                resources.append((template, expanded))
            elif deny:
                if connect:
                    resources.append((template, _fail_closed_client_id(template)))
                else:
                    resources.extend((template, f) for f in _fail_closed(template, subject, group))
            else:
                dropped.append(template)
    return CompiledStatement(name, statement, tuple(dict.fromkeys(resources)), tuple(dropped))


# --- matching ------------------------------------------------------------------------


def _filter_regex(topic_filter: str) -> str:
    """A regular expression that matches exactly the topic names ``topic_filter`` matches
    (topic names hold no ``+`` or ``#``, so neither is matched)."""
    levels = topic_filter.split("/")
    out = ""
    for i, level in enumerate(levels):
        if level == "#":
            tail = "(?!\\$)[^+#]*" if i == 0 else "(?:/[^+#]*)?"
            return out + tail
        part = ("(?!\\$)[^/+#]*" if i == 0 else "[^/+#]*") if level == "+" else re.escape(level)
        out += part if i == 0 else "/" + part
    return out


@dataclass(frozen=True, slots=True)
class _Entry:
    decision: Decision
    template: str
    expanded: str
    conditions: Conditions


_Matcher = Callable[[str], "_Entry | None"]
_WILD_FIRST: Final = ("+", "#")


def _first_level(topic_filter: str) -> str:
    return topic_filter.partition("/")[0]


def _literal_part(topic_filter: str) -> str:
    """The levels before the first wildcard (``a/b`` of ``a/b/+/c``)."""
    levels = []
    for level in topic_filter.split("/"):
        if level in _WILD_FIRST:
            break
        levels.append(level)
    return "/".join(levels)


def _regex(entries: list[_Entry]) -> Callable[[str], re.Match[str] | None]:
    """One alternative per entry, in order (capturing group i + 1), their common literal prefix
    matched once: alternatives that share a long prefix then fail at their first char."""
    regexes = [_filter_regex(e.expanded) for e in entries]
    prefix = ""
    if all(_first_level(e.expanded) not in _WILD_FIRST for e in entries):
        literal = [_literal_part(e.expanded) for e in entries]
        prefix = re.escape(literal[0][: len(commonprefix(literal))])  # noqa: RUF071 (chars)
        if not all(r.startswith(prefix) for r in regexes):
            prefix = ""
    body = "|".join(f"({r[len(prefix) :]})" for r in regexes)
    return re.compile(f"{prefix}(?:{body})", re.DOTALL).fullmatch


_FEW: Final = 6  # up to this many wildcard filters are tried one by one, not by regex


def _loop(wild: list[_Entry]) -> Callable[[str], _Entry | None]:
    """Try each filter in turn; ``<literal>/#`` (the usual kind) as a prefix test."""
    tests: list[tuple[int, str, str, _Entry]] = []
    for entry in wild:
        f = entry.expanded
        if f == "#":
            tests.append((1, "", "", entry))
        elif f.endswith("/#") and "+" not in f and f.count("#") == 1:
            tests.append((0, f[:-2], f[:-1], entry))
        else:
            tests.append((2, f, "", entry))

    def find(topic: str) -> _Entry | None:
        for kind, a, b, entry in tests:
            if kind == 0:
                if topic == a or topic.startswith(b):
                    return entry
            elif kind == 1:
                if topic[:1] != "$":
                    return entry
            elif matches(a, topic):
                return entry
        return None

    return find


def _by_regex(wild: list[_Entry]) -> Callable[[str], _Entry | None]:
    """One regular expression per first level of the filters, compiled when first used."""
    anywhere = [e for e in wild if _first_level(e.expanded) in _WILD_FIRST]
    firsts = {_first_level(e.expanded) for e in wild} - set(_WILD_FIRST)
    groups = {
        first: [e for e in wild if _first_level(e.expanded) in (first, "+", "#")]
        for first in firsts
    }
    _Index = tuple[Callable[[str], re.Match[str] | None], list[_Entry]]
    built: dict[str, _Index] = {}  # per first level named by a filter: bounded by the policy
    nothing: _Index = (lambda topic: None, [])

    def build(first: str) -> _Index:
        entries = groups.get(first, anywhere)
        index = (_regex(entries), entries) if entries else nothing
        built[first if first in groups else "#"] = index  # no topic's first level is "#"
        return index

    def find(topic: str) -> _Entry | None:
        first = topic.partition("/")[0]
        index = built.get(first)
        if index is None:
            index = built.get("#") if first not in groups else None
            if index is None:
                index = build(first)
        m = index[0](topic)
        # one capturing group per alternative, in order: the last one matched is the entry
        return None if m is None else index[1][m.lastindex - 1]  # type: ignore[operator]

    return find


def _matcher(deny: list[_Entry], allow: list[_Entry]) -> _Matcher:
    """The entry that decides a topic: a Deny one if any matches, else the first Allow.

    The filters are tried in order, Deny first, so the first match is the decision; when
    there is no Deny entry, a dictionary of the exact filters first. Many wildcard filters
    are matched by regular expressions (one per first level, alternatives in order).
    """
    exact: dict[str, _Entry] = {}
    wild: list[_Entry] = []
    if deny:
        wild = [*deny, *allow]
    else:
        for entry in allow:
            if "+" in entry.expanded or "#" in entry.expanded:
                wild.append(entry)
            else:
                exact.setdefault(entry.expanded, entry)
    get = exact.get
    if not wild:
        return get
    rest = _loop(wild) if len(wild) <= _FEW else _by_regex(wild)
    if not exact:
        return rest

    def find(topic: str) -> _Entry | None:
        found = get(topic)
        return found if found is not None else rest(topic)

    return find


_TopicDecide = Callable[[str, int, bool], Decision]
_FLAGS: Final = tuple((qos, retain) for qos in (0, 1, 2) for retain in (False, True))


def _topic_decider(deny: list[_Entry], allow: list[_Entry], default: Decision) -> _TopicDecide:
    """PUBLISH/RETAIN/RECEIVE: the decision for a topic name.

    One matcher per (QoS, retain) with the entries whose conditions hold for it, shared
    between the pairs that hold the same entries (all six, when no statement has a
    condition).
    """
    matchers: dict[tuple[int, ...], _Matcher] = {}
    table: list[_Matcher] = []
    for qos, retain in _FLAGS:
        d = [e for e in deny if e.conditions.hold(qos, retain)]
        a = [e for e in allow if e.conditions.hold(qos, retain)]
        key = (*(id(e) for e in d), -1, *(id(e) for e in a))
        if key not in matchers:
            matchers[key] = _matcher(d, a)
        table.append(matchers[key])
    if len(matchers) == 1:
        find = table[0]  # the common case: flags change nothing

        def simple(topic: str, qos: int, retain: bool) -> Decision:
            if not topic:
                return default
            found = find(topic)
            return default if found is None else found.decision

        return simple

    def flagged(topic: str, qos: int, retain: bool) -> Decision:
        if not topic or not 0 <= qos <= 2:
            return default
        found = table[qos + qos + retain](topic)
        return default if found is None else found.decision

    return flagged


def _subscribe_decider(deny: list[_Entry], allow: list[_Entry], default: Decision) -> _TopicDecide:
    """SUBSCRIBE: contained in an Allow filter, intersecting no Deny filter."""
    plain = all(e.conditions.empty for e in (*deny, *allow))
    deny_filters = [(e.expanded, e) for e in deny]
    allow_filters = [(e.expanded, e) for e in allow]

    def decide(requested: str, qos: int, retain: bool) -> Decision:
        try:
            _, inner = parse_shared(requested)
        except InvalidTopic:
            return default
        for f, entry in deny_filters:
            if (plain or entry.conditions.hold(qos, retain)) and filters_intersect(f, inner):
                return entry.decision
        for f, entry in allow_filters:
            if (plain or entry.conditions.hold(qos, retain)) and filter_contains(f, inner):
                return entry.decision
        return default

    return decide


def _connect_decider(deny: list[_Entry], allow: list[_Entry], default: Decision) -> _TopicDecide:
    """CONNECT: a pattern ending in ``*`` is a prefix (values never hold ``*``)."""

    def covered(entry: _Entry, client_id: str) -> bool:
        pattern = entry.expanded
        if pattern.endswith("*"):
            return client_id.startswith(pattern[:-1])
        return client_id == pattern

    def decide(client_id: str, qos: int, retain: bool) -> Decision:
        for entry in deny:
            if covered(entry, client_id):
                return entry.decision
        for entry in allow:
            if covered(entry, client_id):
                return entry.decision
        return default

    return decide


class CompiledPolicy:
    """The statements that apply to one device, expanded and indexed: `decide` is one or
    two dictionary or regular-expression lookups in the common case."""

    __slots__ = (
        "_connect",
        "_publish",
        "_receive",
        "_retain",
        "_subscribe",
        "default",
        "drop_denied_publish_v3",
        "publish_flags_matter",
        "statements",
        "subject",
        "version",
    )

    def __init__(
        self,
        subject: Subject,
        statements: Iterable[CompiledStatement],
        *,
        version: int = 0,
        drop_denied_publish_v3: bool = False,
    ) -> None:
        self.subject = subject
        self.version = version
        self.statements = tuple(statements)
        self.drop_denied_publish_v3 = drop_denied_publish_v3
        self.default = Decision(False, Reason.TOPIC_NOT_AUTHORIZED, DEFAULT_DENY, version)
        connect_default = Decision(False, Reason.CLIENT_ID_MISMATCH, DEFAULT_DENY, version)
        per_action: dict[Action, tuple[list[_Entry], list[_Entry]]] = {a: ([], []) for a in Action}
        flagged = False
        for compiled in self.statements:
            deny = compiled.effect is Effect.DENY
            if deny:
                reason = (
                    Reason.CLIENT_ID_MISMATCH
                    if _is_connect(compiled)
                    else (Reason.TOPIC_NOT_AUTHORIZED)
                )
            else:
                reason = Reason.OK
            decision = Decision(not deny, reason, compiled.name, version)
            for action in compiled.statement.actions:
                if action in (Action.PUBLISH, Action.RETAIN) and not compiled.conditions.empty:
                    flagged = True
                target = per_action[action][0 if deny else 1]
                for template, expanded in compiled.resources:
                    target.append(_Entry(decision, template, expanded, compiled.conditions))
        publish, retain = per_action[Action.PUBLISH], per_action[Action.RETAIN]
        self.publish_flags_matter = flagged or _keys(publish) != _keys(retain)
        self._publish = _topic_decider(*publish, self.default)
        self._retain = _topic_decider(*retain, self.default)
        self._receive = _topic_decider(*per_action[Action.RECEIVE], self.default)
        self._subscribe = _subscribe_decider(*per_action[Action.SUBSCRIBE], self.default)
        self._connect = _connect_decider(*per_action[Action.CONNECT], connect_default)

    def decide(
        self, action: Action, topic_or_filter: str, *, qos: int = 0, retain: bool = False
    ) -> Decision:
        """Judge one request.

        Args:
            action: ``PUBLISH`` (a topic name; with ``retain`` it is judged as ``RETAIN``
                too), ``RETAIN``, ``RECEIVE`` (a delivered topic), ``SUBSCRIBE`` (a filter,
                possibly ``$share/<group>/<filter>``) or ``CONNECT`` (a client id).
            topic_or_filter: What the device asked for, as received.
            qos: The packet's QoS (SUBSCRIBE: the requested maximum).
            retain: The packet's retain flag.
        """
        if action is Action.PUBLISH:
            decision = self._publish(topic_or_filter, qos, retain)
            if retain and decision.allowed:
                return self._retain(topic_or_filter, qos, retain)
            return decision
        if action is Action.SUBSCRIBE:
            return self._subscribe(topic_or_filter, qos, retain)
        if action is Action.RECEIVE:
            return self._receive(topic_or_filter, qos, retain)
        if action is Action.RETAIN:
            return self._retain(topic_or_filter, qos, True)
        return self._connect(topic_or_filter, qos, retain)

    def decide_one(
        self, action: Action, topic_or_filter: str, *, qos: int = 0, retain: bool = False
    ) -> Decision:
        """`decide` for ``action`` alone (a retained PUBLISH not judged as RETAIN too)."""
        if action is Action.PUBLISH:
            return self._publish(topic_or_filter, qos, retain)
        return self.decide(action, topic_or_filter, qos=qos, retain=retain)

    def client_id_allowed(self, client_id: str) -> bool:
        """Whether the device may connect with ``client_id``."""
        return self._connect(client_id, 0, False).allowed

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.statements)
        return f"CompiledPolicy({self.subject.device_id!r}, v{self.version}, [{names}])"


def _is_connect(compiled: CompiledStatement) -> bool:
    return Action.CONNECT in compiled.statement.actions


def _keys(rules: tuple[list[_Entry], list[_Entry]]) -> tuple[object, ...]:
    return tuple(tuple((e.expanded, e.conditions) for e in side) for side in rules)


# --- the set ---------------------------------------------------------------------------


class _Snapshot(Protocol):
    """`schemas.policy_store.PolicySnapshot` as this module reads it."""

    @property
    def version(self) -> int: ...

    @property
    def documents(self) -> Mapping[str, object]: ...

    @property
    def attachments(self) -> Iterable[tuple[str, str, str]]: ...

    @property
    def groups(self) -> Mapping[str, frozenset[str]]: ...

    @property
    def attributes(self) -> Mapping[str, Mapping[str, str]]: ...


class PolicySet:
    """Every policy, where it is attached, and (from the database) each device's groups
    and attributes, at one version. Immutable; compiles per subject on demand.

    Which policies apply to a device: those attached to its fleet (or, when its fleet has
    none, those attached to ``"*"``), to any of its groups, and to the device itself.
    """

    def __init__(
        self,
        document: PolicyFile,
        *,
        version: int = 0,
        groups: Mapping[str, frozenset[str]] | None = None,
        attributes: Mapping[str, Mapping[str, str]] | None = None,
        cache_size: int = _CACHE_SIZE,
    ) -> None:
        problems = _filter_problems(document)
        if problems:
            raise PolicyError("\n".join(problems), problems=tuple(problems))
        self.document = document
        self.version = version
        self.groups: Mapping[str, frozenset[str]] = groups or {}
        self.attributes: Mapping[str, Mapping[str, str]] = attributes or {}
        self._fleets: dict[str, list[str]] = {}
        self._by_group: dict[str, list[str]] = {}
        self._by_device: dict[str, list[str]] = {}
        for attachment in document.attach:
            index = {"fleet": self._fleets, "group": self._by_group, "device": self._by_device}
            index[attachment.kind].setdefault(attachment.target, []).append(attachment.policy)
        self._order = {name: i for i, name in enumerate(document.policies)}
        self._cache: OrderedDict[tuple[object, ...], CompiledPolicy] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_document(cls, document: PolicyFile | PolicyDocument, version: int = 0) -> PolicySet:
        """From a file in either format (`schemas.policy.parse_document`).

        Raises:
            PolicyError: a resource is no valid topic filter.
        """
        if isinstance(document, PolicyDocument):
            document = document.to_policy_file()
        return cls(document, version=version)

    @classmethod
    def from_snapshot(cls, snapshot: _Snapshot) -> PolicySet:
        """From the database's snapshot (`schemas.policy_store.PolicySnapshot`). With no
        document stored, the built-in default decides (with the snapshot's groups and
        attributes): groups, attributes and enrollments bump the version too, so a version
        above 0 does not mean a policy was applied.

        Raises:
            PolicyError: a stored document does not validate.
        """
        if not snapshot.documents:
            return cls(
                PolicyDocument().to_policy_file(),
                version=snapshot.version,
                groups=snapshot.groups,
                attributes=snapshot.attributes,
            )
        policies: dict[str, Policy] = {}
        problems: list[str] = []
        for name, raw in snapshot.documents.items():
            data = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
            try:
                policies[name] = Policy.model_validate(data)
            except ValidationError as exc:
                problems += [f"policy {name}: {p.message}" for p in problems_of(exc, Policy)]
        if problems:
            raise PolicyError("\n".join(problems), problems=tuple(problems))
        attach = tuple(
            Attachment.model_validate({"policy": name, kind: target})
            for name, kind, target in snapshot.attachments
            if name in policies
        )
        document = PolicyFile(policies=policies, attach=attach)
        return cls(
            document,
            version=snapshot.version,
            groups=snapshot.groups,
            attributes=snapshot.attributes,
        )

    def subject(
        self,
        identity: _Identity,
        *,
        cert_serial: str = "",
        spiffe_id: str | None = None,
    ) -> Subject:
        """The subject for ``identity``, with its groups and attributes from this set."""
        return Subject(
            device_id=identity.device_id,
            fleet=identity.fleet,
            groups=self.groups.get(identity.device_id, frozenset()),
            attributes=self.attributes.get(identity.device_id, {}),
            cert_serial=cert_serial,
            spiffe_id=spiffe_id,
        )

    def applicable(self, subject: Subject) -> list[tuple[str, frozenset[str]]]:
        """The policies that apply to ``subject``, in document order, each with the groups
        it is attached through (what ``{group}`` ranges over without ``groups``)."""
        fleet = self._fleets.get(subject.fleet)
        names = list(fleet if fleet is not None else self._fleets.get(ANY_FLEET, ()))
        via: dict[str, set[str]] = {}
        for group in sorted(subject.groups):
            for name in self._by_group.get(group, ()):
                via.setdefault(name, set()).add(group)
        names += via
        names += self._by_device.get(subject.device_id, ())
        unique = sorted(set(names), key=self._order.__getitem__)
        return [(name, frozenset(via.get(name, ()))) for name in unique]

    def compile(self, subject: Subject) -> CompiledPolicy:
        """`for_subject` without the cache."""
        statements = []
        drop = False
        for name, via_groups in self.applicable(subject):
            policy = self.document.policies[name]
            drop = drop or policy.drop_denied_publish_v3
            for statement in policy.statements:
                compiled = _compile_statement(
                    f"{name}/{statement.id}", statement, subject, via_groups
                )
                if compiled is not None:
                    statements.append(compiled)
        return CompiledPolicy(
            subject, statements, version=self.version, drop_denied_publish_v3=drop
        )

    def for_subject(self, subject: Subject) -> CompiledPolicy:
        """The compiled policy of ``subject`` (cached, least recently used dropped)."""
        key = subject.key()
        cache = self._cache
        compiled = cache.get(key)
        if compiled is not None:
            cache.move_to_end(key)
            return compiled
        compiled = self.compile(subject)
        cache[key] = compiled
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return compiled


def compile_for(
    document: PolicyFile | PolicyDocument | FleetPolicy, identity: _Identity, version: int = 0
) -> CompiledPolicy:
    """The compiled policy of one device under ``document`` (a `FleetPolicy`: that
    section as every fleet's default). For tests and tools; the gateway keeps a `PolicySet`.
    """
    if isinstance(document, FleetPolicy):
        document = PolicyDocument(default=document)
    policy_set = PolicySet.from_document(document, version)
    return policy_set.for_subject(policy_set.subject(identity))


def _filter_problems(document: PolicyFile) -> list[str]:
    """Each topic resource must expand to a valid filter (with sample values)."""
    problems = []
    for name, policy in document.policies.items():
        for i, statement in enumerate(policy.statements):
            if Action.CONNECT in statement.actions:
                continue
            for j, template in enumerate(statement.resources):
                sample = _VARIABLE.sub("x", template)
                try:
                    validate_topic_filter(sample)
                except InvalidTopic as exc:
                    where = f"policies.{name}.statements[{i}].resources[{j}]"
                    problems.append(f"{where}: {exc}")
    return problems


def upstream_client_id(device_id: str, client_id: str) -> str:
    """The broker's session key for ``client_id`` of ``device_id``, disjoint per device.

    Device ids are ``[a-z0-9][a-z0-9-]*`` (`gateway.identity`), so ``:`` never occurs in
    one: a device's own id is kept as is, any other client id becomes
    ``<device_id>:<client_id>``, which no other device can produce. Without this, a
    ``{device_id}-*`` pattern would let device ``x`` take over (and read) the broker
    session of device ``x-2``.
    """
    return client_id if client_id == device_id else f"{device_id}:{client_id}"
