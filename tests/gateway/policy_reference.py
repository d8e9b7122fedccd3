"""A straightforward policy evaluator, written from docs/policy.md, to check the compiled one.

No caching, no indexes, no regular expressions: every request walks every statement of
the policies that apply, expands its resources on the spot and compares with the
one topic matcher (`gateway.mqtt.topics`). It returns every statement that covers the
request, so a test can check that the compiled evaluator names one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.mqtt.errors import InvalidTopic
from gateway.mqtt.topics import (
    filter_contains,
    filters_intersect,
    matches,
    parse_shared,
    validate_topic_filter,
)
from gateway.policy import Subject
from schemas.policy import ANY_FLEET, Action, Effect, PolicyFile, Statement, variables_of


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    statements: frozenset[str]  # those of the deciding effect that cover the request


DEFAULT = Verdict(False, frozenset())


def applicable(document: PolicyFile, subject: Subject) -> list[tuple[str, frozenset[str]]]:
    """(policy name, groups it is attached through), in document order."""
    fleet_names = [a.policy for a in document.attach if a.fleet == subject.fleet]
    if not fleet_names:
        fleet_names = [a.policy for a in document.attach if a.fleet == ANY_FLEET]
    out = []
    for name in document.policies:
        via = frozenset(
            a.group for a in document.attach if a.policy == name and a.group in subject.groups
        )
        direct = name in fleet_names or any(
            a.policy == name and a.device == subject.device_id for a in document.attach
        )
        if direct or via:
            out.append((name, via))
    return out


def _value(subject: Subject, name: str, group: str | None) -> str | None:
    values: dict[str, str | None] = {
        "device_id": subject.device_id,
        "fleet": subject.fleet,
        "group": group,
        "cert.serial": subject.cert_serial or None,
        "cert.spiffe_id": subject.spiffe_id,
    }
    if name.startswith("attr."):
        return subject.attributes.get(name.removeprefix("attr."))
    return values[name]


def _unsafe(value: str | None, connect: bool) -> bool:
    if value is None or value == "":
        return True
    if connect:
        return "*" in value or "\x00" in value
    return value.startswith("$") or any(c in value for c in "+#/\x00")


def _literal(template: str, subject: Subject, group: str | None) -> str:
    out = template
    for name in variables_of(template):
        out = out.replace("{" + name + "}", _value(subject, name, group) or "", 1)
    return out


def _valid(topic_filter: str) -> bool:
    try:
        validate_topic_filter(topic_filter)
    except InvalidTopic:
        return False
    return True


def filters(statement: Statement, subject: Subject, via: frozenset[str]) -> list[str] | None:
    """The statement's resources for ``subject``; None when it does not apply to it."""
    if statement.groups:
        groups = set(statement.groups) & subject.groups
        if not groups:
            return None
    else:
        groups = set(via)
    connect = Action.CONNECT in statement.actions
    deny = statement.effect is Effect.DENY
    out = []
    for template in statement.resources:
        names = variables_of(template)
        for group in sorted(groups) if "group" in names and groups else [None]:
            bad = [n for n in names if _unsafe(_value(subject, n, group), connect)]
            if not bad:
                literal = _literal(template, subject, group)
                if connect or _valid(literal):
                    out.append(literal)
                    continue
            if not deny:
                continue
            if connect:
                out.append(template.split("{")[0] + "*")
                continue
            levels = template.split("/")
            for i, level in enumerate(levels):
                if any(_unsafe(_value(subject, n, group), False) for n in variables_of(level)):
                    out.append("/".join([*levels[:i], "#"]))
                    break
            literal = _literal(template, subject, group)
            if _valid(literal):
                out.append(literal)
    return out


def _covers(action: Action, effect: Effect, resource: str, asked: str) -> bool:
    if action is Action.CONNECT:
        if resource.endswith("*"):
            return asked.startswith(resource[:-1])
        return asked == resource
    if action is Action.SUBSCRIBE:
        inner = parse_shared(asked)[1]
        if effect is Effect.DENY:
            return filters_intersect(resource, inner)
        return filter_contains(resource, inner)
    return matches(resource, asked)


def _one(
    document: PolicyFile, subject: Subject, action: Action, asked: str, qos: int, retain: bool
) -> Verdict:
    if action is Action.SUBSCRIBE:
        try:
            parse_shared(asked)
        except InvalidTopic:
            return DEFAULT
    elif action is not Action.CONNECT and (not asked or "+" in asked or "#" in asked):
        return DEFAULT
    covering: dict[Effect, set[str]] = {Effect.ALLOW: set(), Effect.DENY: set()}
    for name, via in applicable(document, subject):
        for statement in document.policies[name].statements:
            if action not in statement.actions:
                continue
            if not statement.conditions.hold(qos, retain):
                continue
            resources = filters(statement, subject, via)
            if resources is None:
                continue
            if any(_covers(action, statement.effect, r, asked) for r in resources):
                covering[statement.effect].add(f"{name}/{statement.id}")
    if covering[Effect.DENY]:
        return Verdict(False, frozenset(covering[Effect.DENY]))
    if covering[Effect.ALLOW]:
        return Verdict(True, frozenset(covering[Effect.ALLOW]))
    return DEFAULT


def decide(
    document: PolicyFile,
    subject: Subject,
    action: Action,
    asked: str,
    qos: int = 0,
    retain: bool = False,
) -> Verdict:
    """The verdict on one request; a retained PUBLISH is judged as RETAIN too."""
    if action is Action.RETAIN:
        return _one(document, subject, Action.RETAIN, asked, qos, True)
    verdict = _one(document, subject, action, asked, qos, retain)
    if action is Action.PUBLISH and retain and verdict.allowed:
        return _one(document, subject, Action.RETAIN, asked, qos, retain)
    return verdict
