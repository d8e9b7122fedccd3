"""The topic policy evaluator of the per-fleet format, frozen as it was before statements
(gateway/policy.py until issue 23), for tests/gateway/test_policy_migration.py: the new
evaluator must decide every request exactly as this one did. Do not change it.

Topic policy: may this device publish to this topic, subscribe to this filter?

Invariants:

* ``authorize`` is pure: same identity, action, topic and policy give the same decision;
  no I/O, no clock. Deny by default: only what a template allows is allowed.
* Templates name ``{device_id}`` and ``{fleet}``, substituted literally (never
  ``str.format``). A value that is empty or holds ``+``, ``#``, ``/`` or U+0000 would widen
  the filter, so a template using it expands to nothing: it allows nothing.
* PUBLISH: the topic must match an allowed filter (``topics.matches``). SUBSCRIBE: the
  filter (for ``$share/<group>/<filter>`` the inner filter) must be contained in an
  allowed filter (``topics.filter_contains``); the filter the broker matches is judged.
* Topics starting with ``$`` are only reachable through a template naming them
  (``$SYS/#`` is never inside ``#``), as the topic rules say.
* A policy document is validated when loaded: each template must expand to a valid filter.
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from pydantic import ValidationError

from gateway.mqtt.errors import InvalidTopic
from gateway.mqtt.topics import (
    filter_contains,
    matches,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)
from schemas.errors import DevicegateError
from schemas.events import Reason
from schemas.policy import FleetPolicy, PolicyDocument, Problem, problems_of

__all__ = [
    "ALLOWED",
    "DENIED",
    "Action",
    "Decision",
    "Explanation",
    "PolicyError",
    "Subject",
    "authorize",
    "client_id_allowed",
    "expand",
    "explain",
    "load_policy",
]

_UNSAFE: Final = frozenset("+#/\x00")


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


class Subject(Protocol):
    """What the policy needs to know about a device (``identity.DeviceIdentity`` fits)."""

    @property
    def device_id(self) -> str: ...

    @property
    def fleet(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict, with the reason it is recorded under."""

    allowed: bool
    reason: Reason


ALLOWED: Final = Decision(True, Reason.OK)
DENIED: Final = Decision(False, Reason.TOPIC_NOT_AUTHORIZED)


class PolicyError(DevicegateError):
    """The policy file is missing, unreadable or invalid.

    Attributes:
        problems: One ``FILE[:LINE]: sentence`` per problem found.
    """

    def __init__(self, message: str, *, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


def _safe(value: str) -> bool:
    return bool(value) and _UNSAFE.isdisjoint(value)


def _substitute(template: str, device_id: str, fleet: str) -> str | None:
    if "{device_id}" in template:
        if not _safe(device_id):
            return None
        template = template.replace("{device_id}", device_id)
    if "{fleet}" in template:
        if not _safe(fleet):
            return None
        template = template.replace("{fleet}", fleet)
    return template


@functools.lru_cache(maxsize=4096)
def _expand(templates: tuple[str, ...], device_id: str, fleet: str) -> tuple[tuple[str, str], ...]:
    out = []
    for template in templates:
        topic_filter = _substitute(template, device_id, fleet)
        if topic_filter is None:
            continue
        try:
            validate_topic_filter(topic_filter)
        except InvalidTopic:
            continue
        out.append((template, topic_filter))
    return tuple(out)


def expand(templates: tuple[str, ...], subject: Subject) -> tuple[str, ...]:
    """The filters ``templates`` allow for ``subject`` (unsafe substitutions dropped)."""
    return tuple(
        topic_filter for _, topic_filter in _expand(templates, subject.device_id, subject.fleet)
    )


def _allowing(
    subject: Subject, action: Action, topic_or_filter: str, policy: FleetPolicy
) -> tuple[str, str] | None:
    """The first (template, expanded filter) that allows the request, or ``None``."""
    if action is Action.PUBLISH:
        if not topic_or_filter or "+" in topic_or_filter or "#" in topic_or_filter:
            return None
        for template, allowed in _expand(policy.publish, subject.device_id, subject.fleet):
            if matches(allowed, topic_or_filter):
                return template, allowed
        return None
    try:
        _, inner = parse_shared(topic_or_filter)
    except InvalidTopic:
        return None
    for template, allowed in _expand(policy.subscribe, subject.device_id, subject.fleet):
        if filter_contains(allowed, inner):
            return template, allowed
    return None


def authorize(
    subject: Subject, action: Action, topic_or_filter: str, policy: FleetPolicy
) -> Decision:
    """Decide one PUBLISH topic or SUBSCRIBE filter.

    Args:
        subject: The device.
        action: ``PUBLISH`` (``topic_or_filter`` is a topic name) or ``SUBSCRIBE`` (a
            filter, possibly ``$share/<group>/<filter>``).
        topic_or_filter: What the device asked for, as received.
        policy: The device's fleet policy.

    Returns:
        `ALLOWED` or `DENIED` (``topic_not_authorized``).
    """
    return DENIED if _allowing(subject, action, topic_or_filter, policy) is None else ALLOWED


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why `authorize` decides what it decides (``devicegate policy explain``).

    Attributes:
        decision: What `authorize` returns for the same arguments.
        template: The template that allowed it, as written; ``None`` when denied.
        expanded: That template with the device's values substituted.
        why: The reason in words.
    """

    decision: Decision
    template: str | None
    expanded: str | None
    why: str


def explain(
    subject: Subject, action: Action, topic_or_filter: str, policy: FleetPolicy
) -> Explanation:
    """`authorize`, with the template that made the decision."""
    found = _allowing(subject, action, topic_or_filter, policy)
    if found is not None:
        template, expanded = found
        how = "matches" if action is Action.PUBLISH else "is contained in"
        why = f"{topic_or_filter!r} {how} {expanded!r}, from the template {template!r}"
        return Explanation(ALLOWED, template, expanded, why)
    templates = policy.publish if action is Action.PUBLISH else policy.subscribe
    if action is Action.PUBLISH:
        try:
            validate_topic_name(topic_or_filter)
        except InvalidTopic as exc:
            return Explanation(DENIED, None, None, f"not a valid topic name: {exc}")
    else:
        try:
            parse_shared(topic_or_filter)
        except InvalidTopic as exc:
            return Explanation(DENIED, None, None, f"not a valid topic filter: {exc}")
    dropped = set(templates) - {t for t, _ in _expand(templates, subject.device_id, subject.fleet)}
    why = f"no {action.value} template allows it (deny by default)"
    if dropped:
        why += "; left out because a value holds '+', '#', '/' or is empty: " + ", ".join(
            repr(t) for t in templates if t in dropped
        )
    return Explanation(DENIED, None, None, why)


def upstream_client_id(device_id: str, client_id: str) -> str:
    """The broker's session key for ``client_id`` of ``device_id``, disjoint per device.

    Device ids are ``[a-z0-9][a-z0-9-]*`` (`gateway.identity`), so ``:`` never occurs in
    one: a device's own id is kept as is, any other client id becomes
    ``<device_id>:<client_id>``, which no other device can produce. Without this, a
    ``{device_id}-*`` template would let device ``x`` take over (and read) the broker
    session of device ``x-2``.
    """
    return client_id if client_id == device_id else f"{device_id}:{client_id}"


def client_id_allowed(subject: Subject, client_id: str, policy: FleetPolicy) -> bool:
    """Whether ``client_id`` is one the fleet's ``client_ids`` templates allow.

    A template is an exact id, a prefix ending in ``*`` (``{device_id}-*``), or ``*``.
    """
    for template in policy.client_ids:
        if template == "*":
            return True
        expanded = _substitute(template, subject.device_id, subject.fleet)
        if expanded is None:
            continue
        if expanded.endswith("*"):
            if client_id.startswith(expanded[:-1]):
                return True
        elif client_id == expanded:
            return True
    return False


def _filter_problems(document: PolicyDocument) -> list[Problem]:
    problems = []
    fleets: list[tuple[tuple[str, ...], FleetPolicy]] = [(("default",), document.default)]
    fleets += [(("fleets", name), policy) for name, policy in document.fleets.items()]
    for where, fleet_policy in fleets:
        for field in ("publish", "subscribe"):
            for index, template in enumerate(getattr(fleet_policy, field)):
                expanded = _substitute(template, "device", "fleet")
                try:
                    validate_topic_filter(expanded or "")
                except InvalidTopic as exc:
                    path = (*where, field, index)
                    name = ".".join(where) + f".{field}[{index}]"
                    problems.append(Problem(path, f"{name}: {exc}", template))
    return problems


_WORD: Final = r"(?<![\w-]){}(?![\w-])"
_TOML_AT: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _line(text: str, problem: Problem) -> int | None:
    """The line of ``problem`` in the file: each key of its path in turn, then its token."""
    pos, found = 0, False
    for part in problem.path:
        if isinstance(part, str):
            match = re.compile(_WORD.format(re.escape(part))).search(text, pos)
            if match is not None:
                pos, found = match.start(), True
    if problem.token:
        at = text.find(problem.token, pos)
        if at < 0:
            at = text.find(problem.token)
        if at >= 0:
            pos, found = at, True
    return text.count("\n", 0, pos) + 1 if found else None


def _decode(path: Path, text: str) -> object:
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = _TOML_AT.search(message)
        if at is None:
            raise PolicyError(f"{path}: not valid TOML: {message}") from None
        where = f"{path}:{at.group(1)}"
        raise PolicyError(f"{where}: not valid TOML: {message[: at.start()]}") from None


def load_policy(path: Path | None) -> PolicyDocument:
    """Read a policy document (TOML, or JSON for a ``.json`` file); ``None``: the default.

    Raises:
        PolicyError: unreadable file, bad syntax, unknown keys or placeholders, invalid
            templates; ``problems`` holds one ``FILE[:LINE]: sentence`` per problem.
    """
    if path is None:
        return PolicyDocument()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyError(f"{path}: cannot read the policy file: {why}") from None
    data = _decode(path, text)
    try:
        document = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        problems = problems_of(exc)
    else:
        problems = _filter_problems(document)
    if problems:
        lines = []
        for problem in problems:
            line = _line(text, problem)
            lines.append(f"{path}{'' if line is None else f':{line}'}: {problem.message}")
        raise PolicyError("\n".join(lines), problems=tuple(lines))
    return document
