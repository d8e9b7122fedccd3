"""Topic policy: may this device publish to this topic, subscribe to this filter?

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
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from pydantic import ValidationError

from gateway.mqtt.errors import InvalidTopic
from gateway.mqtt.topics import filter_contains, matches, parse_shared, validate_topic_filter
from schemas.errors import DevicegateError
from schemas.events import Reason
from schemas.policy import FleetPolicy, PolicyDocument

__all__ = [
    "ALLOWED",
    "DENIED",
    "Action",
    "Decision",
    "PolicyError",
    "Subject",
    "authorize",
    "client_id_allowed",
    "expand",
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
    """The policy file is missing, unreadable or invalid."""


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
def _expand(templates: tuple[str, ...], device_id: str, fleet: str) -> tuple[str, ...]:
    out = []
    for template in templates:
        topic_filter = _substitute(template, device_id, fleet)
        if topic_filter is None:
            continue
        try:
            validate_topic_filter(topic_filter)
        except InvalidTopic:
            continue
        out.append(topic_filter)
    return tuple(out)


def expand(templates: tuple[str, ...], subject: Subject) -> tuple[str, ...]:
    """The filters ``templates`` allow for ``subject`` (unsafe substitutions dropped)."""
    return _expand(templates, subject.device_id, subject.fleet)


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
    if action is Action.PUBLISH:
        if not topic_or_filter or "+" in topic_or_filter or "#" in topic_or_filter:
            return DENIED
        for allowed in expand(policy.publish, subject):
            if matches(allowed, topic_or_filter):
                return ALLOWED
        return DENIED
    try:
        _, inner = parse_shared(topic_or_filter)
    except InvalidTopic:
        return DENIED
    for allowed in expand(policy.subscribe, subject):
        if filter_contains(allowed, inner):
            return ALLOWED
    return DENIED


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


def _check(document: PolicyDocument) -> None:
    fleets = [("default", document.default), *document.fleets.items()]
    for name, fleet_policy in fleets:
        for template in (*fleet_policy.publish, *fleet_policy.subscribe):
            expanded = _substitute(template, "device", "fleet")
            try:
                validate_topic_filter(expanded or "")
            except InvalidTopic as exc:
                raise PolicyError(f"fleet {name!r}: template {template!r}: {exc}") from None


def load_policy(path: Path | None) -> PolicyDocument:
    """Read a policy document (TOML, or JSON for a ``.json`` file); ``None``: the default.

    Raises:
        PolicyError: unreadable file, bad syntax, unknown keys or invalid templates.
    """
    if path is None:
        return PolicyDocument()
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        document = PolicyDocument.model_validate(data)
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    except (ValueError, ValidationError) as exc:  # JSON/TOML decode errors are ValueErrors
        raise PolicyError(f"invalid policy file {path}: {exc}") from None
    _check(document)
    return document
