"""Properties of the policy evaluator over random policies, devices and requests.

The compiled evaluator (`gateway.policy`) agrees with the straightforward one in
tests/gateway/policy_reference.py; deny always wins; nothing outside every allowed filter
is ever allowed, ``$`` topics included; `filters_intersect` is exact. Example counts are
bounded (about 200 each) so the suite stays fast.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mqtt.topics import filters_intersect, matches, validate_topic_filter
from gateway.policy import DEFAULT_DENY, PolicyError, PolicySet, Subject
from schemas.policy import (
    ANY_FLEET,
    Action,
    Attachment,
    Conditions,
    Effect,
    Policy,
    PolicyFile,
    Statement,
)
from tests.gateway import policy_reference as reference

SETTINGS = settings(max_examples=200, deadline=None)

LEVELS = ["a", "b", "d1", "plant", "$SYS", "", "s1"]
TEMPLATE_LEVELS = [*LEVELS, "+", "{device_id}", "{fleet}", "{group}", "{attr.site}", "x{device_id}"]
TOPIC_ACTIONS = [Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE, Action.RETAIN]


def _filter(levels: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    body = st.lists(levels, min_size=1, max_size=3)
    return st.builds(
        lambda parts, hash_: "/".join(parts + (["#"] if hash_ else [])), body, st.booleans()
    ).filter(lambda f: f != "")


topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
filters = _filter(st.sampled_from([*LEVELS, "+"])) | st.just("#")
templates = _filter(st.sampled_from(TEMPLATE_LEVELS)) | st.just("#")
client_patterns = st.sampled_from(
    ["{device_id}", "{device_id}-*", "*", "{fleet}-{device_id}", "x-{attr.site}", "d1"]
)
conditions = st.one_of(
    st.just(Conditions()),
    st.builds(Conditions, qos=st.just((0, 1))),
    st.builds(Conditions, max_qos=st.sampled_from([0, 1])),
    st.builds(Conditions, retain=st.booleans()),
)


@st.composite
def statements(draw: st.DrawFn, sid: str) -> Statement:
    effect = draw(st.sampled_from(list(Effect)))
    groups = draw(st.sampled_from([(), (), ("g1",), ("g1", "g2")]))
    if draw(st.integers(0, 5)) == 0:
        resources = draw(st.lists(client_patterns, min_size=1, max_size=2))
        return Statement(
            id=sid, effect=effect, actions=(Action.CONNECT,), resources=tuple(resources)
        )
    actions = draw(st.lists(st.sampled_from(TOPIC_ACTIONS), min_size=1, max_size=3, unique=True))
    resources = draw(st.lists(templates, min_size=1, max_size=3))
    return Statement(
        id=sid,
        effect=effect,
        actions=tuple(actions),
        resources=tuple(resources),
        conditions=draw(conditions),
        groups=groups,
    )


@st.composite
def policy_files(draw: st.DrawFn) -> PolicyFile:
    policies = {}
    for p in range(draw(st.integers(1, 3))):
        count = draw(st.integers(1, 4))
        policies[f"p{p}"] = Policy(
            statements=tuple(draw(statements(f"s{i}")) for i in range(count))
        )
    targets = st.sampled_from(
        [
            {"fleet": ANY_FLEET},
            {"fleet": "plant"},
            {"fleet": "a"},
            {"group": "g1"},
            {"group": "g2"},
            {"device": "d1"},
        ]
    )
    attach = []
    for name in policies:
        for target in draw(st.lists(targets, min_size=1, max_size=2)):
            attach.append(Attachment.model_validate({"policy": name, **target}))
    return PolicyFile(policies=policies, attach=tuple(attach))


subjects = st.builds(
    Subject,
    device_id=st.sampled_from(["d1", "a", "d2", "+", "a/b", "", "$x"]),
    fleet=st.sampled_from(["plant", "a", "#"]),
    groups=st.sampled_from([frozenset(), frozenset({"g1"}), frozenset({"g1", "g2"})]),
    attributes=st.sampled_from([{}, {"site": "s1"}, {"site": "+"}, {"site": ""}]),
)


def _request(action: Action) -> st.SearchStrategy[str]:
    if action is Action.SUBSCRIBE:
        return filters | filters.map(lambda f: f"$share/g/{f}")
    if action is Action.CONNECT:
        return st.sampled_from(["d1", "d1-x", "plant-d1", "x-s1", "a", "", "x-"])
    return topics


@st.composite
def requests(draw: st.DrawFn) -> tuple[Action, str, int, bool]:
    action = draw(st.sampled_from([*TOPIC_ACTIONS, Action.CONNECT]))
    return action, draw(_request(action)), draw(st.integers(0, 2)), draw(st.booleans())


def _compiled_set(document: PolicyFile) -> PolicySet | None:
    try:
        return PolicySet(document)
    except PolicyError:
        return None  # a template that is no valid filter: refused at load, nothing to judge


@SETTINGS
@given(policy_files(), subjects, st.lists(requests(), min_size=1, max_size=8))
def test_compiled_decides_as_the_reference(
    document: PolicyFile, subject: Subject, asked: list[tuple[Action, str, int, bool]]
) -> None:
    policy_set = _compiled_set(document)
    if policy_set is None:
        return
    compiled = policy_set.for_subject(subject)
    for action, what, qos, retain in asked:
        decision = compiled.decide(action, what, qos=qos, retain=retain)
        want = reference.decide(document, subject, action, what, qos, retain)
        assert decision.allowed is want.allowed, (action, what, qos, retain, want)
        if want.statements:
            assert decision.statement in want.statements, (action, what, want)
        else:
            assert decision.statement == DEFAULT_DENY
        assert decision.version == policy_set.version


@SETTINGS
@given(policy_files(), subjects, requests(), st.sampled_from(["exact", "everything"]))
def test_deny_always_wins(
    document: PolicyFile, subject: Subject, request: tuple[Action, str, int, bool], how: str
) -> None:
    action, what, qos, retain = request
    if action is Action.CONNECT:
        resource = what + "*" if how == "everything" or not what else what
    elif how == "everything":
        resource = "#"
    else:
        resource = what.removeprefix("$share/g/") if action is Action.SUBSCRIBE else what
    deny = Statement(id="deny", effect=Effect.DENY, actions=(action,), resources=(resource,))
    policies = dict(document.policies)
    policies["zz-deny"] = Policy(statements=(deny,))
    attach = (*document.attach, Attachment(policy="zz-deny", fleet=ANY_FLEET))
    attach += (Attachment(policy="zz-deny", fleet=subject.fleet),) if subject.fleet else ()
    denied = PolicyFile(policies=policies, attach=attach)
    policy_set = _compiled_set(denied)
    if policy_set is None:
        return
    decision = policy_set.for_subject(subject).decide(action, what, qos=qos, retain=retain)
    if (
        how == "everything"
        and action is not Action.CONNECT
        and what.startswith(("$", "$share/g/$"))
    ):
        return  # '#' does not reach '$' topics: nothing to say here
    assert not decision.allowed, (action, what, resource)


@SETTINGS
@given(policy_files(), subjects, topics, st.integers(0, 2), st.booleans())
def test_nothing_outside_the_allowed_filters_is_allowed(
    document: PolicyFile, subject: Subject, topic: str, qos: int, retain: bool
) -> None:
    policy_set = _compiled_set(document)
    if policy_set is None:
        return
    compiled = policy_set.for_subject(subject)
    for action in (Action.PUBLISH, Action.RECEIVE, Action.RETAIN):
        if not compiled.decide(action, topic, qos=qos, retain=retain).allowed:
            continue
        allowing = [
            f
            for name, via in reference.applicable(document, subject)
            for s in document.policies[name].statements
            if s.effect is Effect.ALLOW and action in s.actions
            for f in reference.filters(s, subject, via) or []
            if matches(f, topic)
        ]
        assert allowing, (action, topic)
        if topic.startswith("$"):
            assert any(f.split("/")[0] == topic.split("/")[0] for f in allowing)


@SETTINGS
@given(filters, filters)
def test_filters_intersect_is_exact(a: str, b: str) -> None:
    validate_topic_filter(a)
    validate_topic_filter(b)
    words = {level for f in (a, b) for level in f.split("/") if level not in ("+", "#")}
    words.add("z")
    depth = max(a.count("/"), b.count("/")) + 2
    witness = any(
        matches(a, topic) and matches(b, topic)
        for n in range(1, depth + 1)
        for levels in itertools.product(sorted(words), repeat=n)
        if (topic := "/".join(levels))
    )
    assert filters_intersect(a, b) is witness
    assert filters_intersect(b, a) is witness
