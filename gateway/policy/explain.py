"""Why a compiled policy decides what it decides (``devicegate policy explain``, the admin
API, the console): the decision itself, never a copy of the rules."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.mqtt.errors import InvalidTopic
from gateway.mqtt.topics import (
    filter_contains,
    filters_intersect,
    matches,
    parse_shared,
    validate_topic_name,
)
from gateway.policy.engine import DEFAULT_DENY, CompiledPolicy, Decision
from schemas.policy import Action, Effect

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision with its grounds.

    Attributes:
        decision: What `CompiledPolicy.decide` returns for the same request.
        action: What was asked.
        statement: ``<policy>/<id>`` that decided, or ``default-deny``.
        version: The policy version.
        resource: The decisive resource as written; None for a default deny.
        expanded: That resource with the device's values.
        why: The reason in words.
        notes: Resources left out for this device (a value missing or unsafe).
    """

    decision: Decision
    action: Action
    statement: str
    version: int
    resource: str | None
    expanded: str | None
    why: str
    notes: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def _covers(action: Action, effect: Effect, expanded: str, asked: str) -> bool:
    if action is Action.CONNECT:
        if expanded.endswith("*"):
            return asked.startswith(expanded[:-1])
        return asked == expanded
    if action is Action.SUBSCRIBE:
        _, inner = parse_shared(asked)
        if effect is Effect.DENY:
            return filters_intersect(expanded, inner)
        return filter_contains(expanded, inner)
    return matches(expanded, asked)


def _verb(action: Action, effect: Effect) -> str:
    if action is Action.CONNECT:
        return "fits the client id pattern"
    if action is Action.SUBSCRIBE:
        return "overlaps" if effect is Effect.DENY else "is contained in"
    return "matches"


def explain(
    compiled: CompiledPolicy,
    action: Action,
    topic_or_filter: str,
    qos: int = 0,
    retain: bool = False,
) -> Explanation:
    """`CompiledPolicy.decide`, with the statement and resource that made the decision."""
    decision = compiled.decide(action, topic_or_filter, qos=qos, retain=retain)
    version = compiled.version
    notes = tuple(
        f"{s.name}: {template!r} expands to nothing for this device "
        "(a value is missing, empty, holds '+', '#', '/' or U+0000, or starts with '$')"
        for s in compiled.statements
        if action in s.statement.actions
        for template in s.dropped
    )
    if decision.statement in (None, DEFAULT_DENY):
        why = _default_why(action, topic_or_filter, qos, retain)
        return Explanation(decision, action, DEFAULT_DENY, version, None, None, why, notes)
    judged = action
    # a retained PUBLISH the publish statements allow is decided as RETAIN
    published = compiled.decide_one(Action.PUBLISH, topic_or_filter, qos=qos, retain=retain)
    if action is Action.PUBLISH and retain and published.allowed:
        judged = Action.RETAIN
    for statement in compiled.statements:
        if statement.name != decision.statement or judged not in statement.statement.actions:
            continue
        for template, expanded in statement.resources:
            if _covers(judged, statement.effect, expanded, topic_or_filter):
                verb = _verb(judged, statement.effect)
                why = (
                    f"{topic_or_filter!r} {verb} {expanded!r} ({template!r}) of "
                    f"{statement.effect.value} statement {statement.name!r}"
                )
                if judged is not action:
                    why += f", judged as {judged.value} (the retain flag is set)"
                if statement.effect is Effect.DENY and not decision.allowed:
                    why += "; deny wins"
                return Explanation(
                    decision, action, statement.name, version, template, expanded, why, notes
                )
    why = f"statement {decision.statement!r}"
    return Explanation(decision, action, decision.statement, version, None, None, why, notes)


def _default_why(action: Action, asked: str, qos: int, retain: bool) -> str:
    try:
        if action in (Action.PUBLISH, Action.RECEIVE, Action.RETAIN):
            validate_topic_name(asked)
        elif action is Action.SUBSCRIBE:
            parse_shared(asked)
    except InvalidTopic as exc:
        what = "topic filter" if action is Action.SUBSCRIBE else "topic name"
        return f"not a valid {what}: {exc}"
    return f"no Allow statement covers {action.value} {asked!r} (deny by default)"
