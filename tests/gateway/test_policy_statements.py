"""Policy documents of statements: deny wins, subscribe semantics, conditions, variables,
failing closed, attachments, snapshots and the compiled-policy cache. Pure: no I/O but
tmp_path files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.policy import (
    DEFAULT_DENY,
    Action,
    PolicyError,
    PolicySet,
    Subject,
    explain,
    load_policy,
)
from schemas.events import Reason
from schemas.policy import PolicyFile

PUB, SUB, RCV, RET, CON = (
    Action.PUBLISH,
    Action.SUBSCRIBE,
    Action.RECEIVE,
    Action.RETAIN,
    Action.CONNECT,
)

POLICY = """\
[policies.base]
description = "every device"

[[policies.base.statements]]
id = "own"
effect = "Allow"
actions = ["publish", "subscribe", "receive"]
resources = ["devices/{device_id}/#"]

[[policies.base.statements]]
id = "no-secrets"
effect = "Deny"
actions = ["publish", "subscribe", "receive"]
resources = ["devices/{device_id}/secret/#"]

[[policies.base.statements]]
id = "site"
effect = "Allow"
actions = ["publish"]
resources = ["sites/{attr.site}/{device_id}"]
conditions = {max_qos = 1}

[[policies.base.statements]]
id = "retained-status"
effect = "Allow"
actions = ["retain"]
resources = ["devices/{device_id}/status"]

[[policies.base.statements]]
id = "client-ids"
effect = "Allow"
actions = ["connect"]
resources = ["{device_id}", "{device_id}-*"]

[policies.ops]
[[policies.ops.statements]]
id = "group-topics"
effect = "Allow"
actions = ["publish", "subscribe"]
resources = ["groups/{group}/#"]

[policies.sys]
[[policies.sys.statements]]
id = "sys"
effect = "Allow"
actions = ["subscribe"]
resources = ["$SYS/broker/clients/+"]

[policies.lab]
[[policies.lab.statements]]
id = "everything"
effect = "Allow"
actions = ["publish", "subscribe"]
resources = ["#"]

[[attach]]
policy = "base"
fleet = "*"

[[attach]]
policy = "ops"
group = "ops"

[[attach]]
policy = "sys"
device = "d9"

[[attach]]
policy = "lab"
fleet = "lab"
"""


@pytest.fixture(scope="module")
def policy_set(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    path = tmp_path_factory.mktemp("policy") / "policy.toml"
    path.write_text(POLICY)
    document = load_policy(path)
    assert isinstance(document, PolicyFile)
    return PolicySet(document, version=7)


def subject(device_id: str = "d1", fleet: str = "plant", **kw: object) -> Subject:
    return Subject(device_id, fleet, **kw)  # type: ignore[arg-type]


def test_deny_wins_and_names_the_statement(policy_set: PolicySet) -> None:
    compiled = policy_set.for_subject(subject())
    allowed = compiled.decide(PUB, "devices/d1/temp")
    assert (allowed.allowed, allowed.statement, allowed.version) == (True, "base/own", 7)
    denied = compiled.decide(PUB, "devices/d1/secret/key")
    assert (denied.allowed, denied.statement, denied.reason) == (
        False,
        "base/no-secrets",
        Reason.TOPIC_NOT_AUTHORIZED,
    )
    assert compiled.decide(PUB, "devices/d2/temp").statement == DEFAULT_DENY
    assert compiled.decide(RCV, "devices/d1/secret").statement == "base/no-secrets"
    assert compiled.decide(RCV, "devices/d1/x").allowed


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        ("devices/d1/public/#", True),
        ("devices/d1/+/x", False),  # would deliver devices/d1/secret/x
        ("devices/d1/#", False),  # would deliver devices/d1/secret/...
        ("devices/d1/secret", False),
        ("$share/g/devices/d1/public/+", True),
        ("$share/g/devices/d1/#", False),
        ("devices/+/x", False),
        ("$SYS/broker/clients/+", False),
    ],
)
def test_a_subscription_must_not_overlap_a_deny(
    policy_set: PolicySet, requested: str, allowed: bool
) -> None:
    assert policy_set.for_subject(subject()).decide(SUB, requested).allowed is allowed


def test_dollar_topics_only_by_name(policy_set: PolicySet) -> None:
    lab = policy_set.for_subject(subject(fleet="lab"))
    assert lab.decide(SUB, "#").allowed and lab.decide(PUB, "any/thing").allowed
    assert not lab.decide(PUB, "$SYS/broker/x").allowed
    assert not lab.decide(SUB, "$SYS/#").allowed
    d9 = policy_set.for_subject(subject("d9"))
    assert d9.decide(SUB, "$SYS/broker/clients/connected").allowed
    assert not d9.decide(SUB, "$SYS/broker/#").allowed


def test_a_fleet_attachment_replaces_the_default(policy_set: PolicySet) -> None:
    lab = policy_set.for_subject(subject(fleet="lab"))
    assert [s.name for s in lab.statements] == ["lab/everything"]
    assert not lab.client_id_allowed("d1")  # the lab policy names no client ids


def test_retain_is_judged_in_addition_to_publish(policy_set: PolicySet) -> None:
    compiled = policy_set.for_subject(subject())
    assert compiled.publish_flags_matter
    assert compiled.decide(PUB, "devices/d1/temp").allowed
    retained = compiled.decide(PUB, "devices/d1/temp", retain=True)
    assert (retained.allowed, retained.statement) == (False, DEFAULT_DENY)
    status = compiled.decide(PUB, "devices/d1/status", retain=True)
    assert (status.allowed, status.statement) == (True, "base/retained-status")
    assert compiled.decide(RET, "devices/d1/status").allowed
    # RETAIN alone does not allow the PUBLISH
    assert not compiled.decide(PUB, "sites/s1/d1", retain=True).allowed


def test_conditions_and_attributes(policy_set: PolicySet) -> None:
    compiled = policy_set.for_subject(subject(attributes={"site": "s1"}))
    assert compiled.decide(PUB, "sites/s1/d1", qos=1).allowed
    assert not compiled.decide(PUB, "sites/s1/d1", qos=2).allowed  # max_qos = 1
    assert not compiled.decide(PUB, "sites/s2/d1").allowed
    # no site attribute, or an unsafe one: the Allow expands to nothing
    for attributes in ({}, {"site": "+"}, {"site": "a/b"}, {"site": ""}, {"site": "$SYS"}):
        bare = policy_set.for_subject(subject(attributes=attributes))
        assert not bare.decide(PUB, "sites/+/d1").allowed
        assert not bare.decide(PUB, "sites/a/b/d1").allowed
        note = explain(bare, PUB, "sites/s1/d1").notes
        assert any("sites/{attr.site}/{device_id}" in n for n in note), note


def test_group_variable_ranges_over_the_attaching_groups(policy_set: PolicySet) -> None:
    ops = policy_set.for_subject(subject(groups=frozenset({"ops", "night"})))
    assert ops.decide(PUB, "groups/ops/x").allowed
    assert not ops.decide(PUB, "groups/night/x").allowed  # "night" attaches nothing
    assert ops.decide(SUB, "groups/ops/#").allowed
    plain = policy_set.for_subject(subject())
    assert not plain.decide(PUB, "groups/ops/x").allowed


def test_statement_groups_and_cert_variables() -> None:
    document = PolicyFile.model_validate(
        {
            "policies": {
                "p": {
                    "statements": [
                        {
                            "id": "team",
                            "effect": "Allow",
                            "actions": ["publish"],
                            "resources": ["teams/{group}/{cert.serial}"],
                            "groups": ["red", "blue"],
                        },
                        {
                            "id": "spiffe",
                            "effect": "Allow",
                            "actions": ["connect"],
                            "resources": ["{cert.spiffe_id}"],
                        },
                    ]
                }
            },
            "attach": [{"policy": "p", "fleet": "*"}],
        }
    )
    policy_set = PolicySet(document)
    spiffe = "spiffe://devicegate.local/fleet/plant/device/d1"
    red = policy_set.for_subject(
        subject(groups=frozenset({"red", "green"}), cert_serial="0a1b", spiffe_id=spiffe)
    )
    assert red.decide(PUB, "teams/red/0a1b").allowed
    assert not red.decide(PUB, "teams/green/0a1b").allowed
    assert red.client_id_allowed(spiffe) and not red.client_id_allowed("d1")
    outsider = policy_set.for_subject(subject(cert_serial="0a1b"))
    # neither red nor blue; no SPIFFE id: the pattern expands to nothing
    assert [(s.name, s.resources) for s in outsider.statements] == [("p/spiffe", ())]
    assert not outsider.client_id_allowed("")


def _deny_document(resource: str, action: str = "publish") -> PolicyFile:
    allow = {"id": "all", "effect": "Allow", "actions": [action], "resources": ["#"]}
    if action == "connect":
        allow["resources"] = ["*"]
    deny = {"id": "deny", "effect": "Deny", "actions": [action], "resources": [resource]}
    return PolicyFile.model_validate(
        {
            "policies": {"p": {"statements": [allow, deny]}},
            "attach": [{"policy": "p", "fleet": "*"}],
        }
    )


@pytest.mark.parametrize("site", [None, "", "+", "#", "a/b", "x\x00"])
def test_a_deny_fails_closed(site: str | None) -> None:
    policy_set = PolicySet(_deny_document("plants/{attr.site}/restricted/#"))
    attributes = {} if site is None else {"site": site}
    compiled = policy_set.for_subject(subject(attributes=attributes))
    for topic in ("plants/s1/restricted/x", "plants/a/b/restricted", "plants/x", "plants"):
        decision = compiled.decide(PUB, topic)
        assert (decision.allowed, decision.statement) == (False, "p/deny"), topic
    assert compiled.decide(PUB, "other/x").allowed
    assert not compiled.decide(SUB, "plants/+/x").allowed
    safe = policy_set.for_subject(subject(attributes={"site": "s1"}))
    assert not safe.decide(PUB, "plants/s1/restricted/x").allowed
    assert safe.decide(PUB, "plants/s2/restricted/x").allowed


def test_a_deny_with_an_unsafe_first_level_covers_everything() -> None:
    compiled = PolicySet(_deny_document("{attr.zone}/#")).for_subject(subject())
    assert not compiled.decide(PUB, "anything/at/all").allowed
    dollar = PolicySet(_deny_document("{attr.zone}/x")).for_subject(
        subject(attributes={"zone": "$SYS"})
    )
    assert not dollar.decide(PUB, "x/x").allowed  # '#' from the variable's level
    assert not dollar.decide(PUB, "$SYS/x").allowed  # and the literal substitution


def test_a_connect_deny_fails_closed() -> None:
    compiled = PolicySet(_deny_document("lab-{attr.bench}", "connect")).for_subject(subject())
    assert not compiled.client_id_allowed("lab-1")
    assert not compiled.client_id_allowed("lab-")
    assert compiled.client_id_allowed("d1")
    decision = compiled.decide(CON, "lab-9")
    assert (decision.statement, decision.reason) == ("p/deny", Reason.CLIENT_ID_MISMATCH)


def test_explain_says_deny_wins(policy_set: PolicySet) -> None:
    said = explain(policy_set.for_subject(subject()), PUB, "devices/d1/secret/x")
    assert (said.allowed, said.statement, said.version) == (False, "base/no-secrets", 7)
    assert said.resource == "devices/{device_id}/secret/#"
    assert said.expanded == "devices/d1/secret/#"
    assert said.why.endswith("deny wins")
    bad = explain(policy_set.for_subject(subject()), SUB, "a/#/b")
    assert bad.statement == DEFAULT_DENY and bad.why.startswith("not a valid topic filter")


@dataclass(frozen=True)
class Snapshot:
    version: int
    documents: Mapping[str, object]
    attachments: tuple[tuple[str, str, str], ...]
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    attributes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


def test_from_snapshot_uses_groups_and_attributes() -> None:
    own = '{"statements": [{"id": "own", "effect": "Allow", "actions": ["publish"], "resources": ["sites/{attr.site}/{group}"]}]}'  # noqa: E501
    snapshot = Snapshot(
        version=42,
        documents={"own": own},
        attachments=(("own", "group", "g1"),),
        groups={"d1": frozenset({"g1"})},
        attributes={"d1": {"site": "s1"}},
    )
    policy_set = PolicySet.from_snapshot(snapshot)

    @dataclass
    class Identity:
        device_id: str
        fleet: str

    compiled = policy_set.for_subject(policy_set.subject(Identity("d1", "plant")))
    decision = compiled.decide(PUB, "sites/s1/g1")
    assert (decision.allowed, decision.statement, decision.version) == (True, "own/own", 42)
    other = policy_set.for_subject(policy_set.subject(Identity("d2", "plant")))
    assert other.decide(PUB, "sites/s1/g1").statement == DEFAULT_DENY
    broken = Snapshot(1, {"bad": '{"statements": [{"id": "x"}]}'}, ())
    with pytest.raises(PolicyError, match="policy bad"):
        PolicySet.from_snapshot(broken)


def test_the_compiled_cache_is_bounded_and_keyed_by_everything() -> None:
    policy_set = PolicySet(_deny_document("x/{attr.k}"), cache_size=2)
    a = policy_set.for_subject(subject("a"))
    assert policy_set.for_subject(subject("a")) is a
    assert policy_set.for_subject(subject("a", attributes={"k": "v"})) is not a
    policy_set.for_subject(subject("b"))
    policy_set.for_subject(subject("c"))
    assert policy_set.for_subject(subject("a")) is not a  # evicted: least recently used


@pytest.mark.parametrize(
    ("edit", "line", "message"),
    [
        (
            ('"devices/{device_id}/#"]', '"devices/{devce_id}/#"]'),
            8,
            "policies.base.statements[0].resources[0]: unknown variable {devce_id}; the "
            "variables are {device_id}, {fleet}, {group}, {attr.<key>}, {cert.serial}, "
            "{cert.spiffe_id}",
        ),
        (
            ('"devices/{device_id}/secret/#"]', '"devices/#/secret"]'),
            14,
            "policies.base.statements[1].resources[0]: '#' must be alone in the last level",
        ),
        (
            ('id = "site"\neffect = "Allow"', 'id = "site"\neffect = "allow"'),
            18,
            "policies.base.statements[2].effect: ",
        ),
        (
            ('actions = ["connect"]', 'actions = ["connect", "publish"]'),
            None,
            "connect resources are client id patterns",
        ),
        (('policy = "sys"', 'policy = "sytem"'), None, "attach names the policy 'sytem'"),
        (
            ("conditions = {max_qos = 1}", "conditions = {max_qos = 1, qos_max = 2}"),
            21,
            "policies.base.statements[2].conditions: unknown key 'qos_max'; the keys are qos, "
            "max_qos, retain",
        ),
    ],
)
def test_a_bad_statement_file_names_file_line_and_fix(
    tmp_path: Path, edit: tuple[str, str], line: int | None, message: str
) -> None:
    path = tmp_path / "policy.toml"
    assert edit[0] in POLICY
    path.write_text(POLICY.replace(edit[0], edit[1], 1))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    where = f"{path}:{line}: " if line is not None else f"{path}"
    assert problem.startswith(where), problem
    assert message in problem, problem


def test_many_filters_by_first_level_including_the_empty_one() -> None:
    """Past a few wildcard filters the matcher indexes them by first level ('' too)."""
    resources = [f"/{i}/+" for i in range(4)] + [f"a{i}/#" for i in range(4)] + ["+/x"]
    document = PolicyFile.model_validate(
        {
            "policies": {
                "p": {
                    "statements": [
                        {"id": "many", "effect": "Allow", "actions": ["publish"],
                         "resources": resources},
                        {"id": "no", "effect": "Deny", "actions": ["publish"],
                         "resources": ["a1/secret"]},
                    ]
                }
            },
            "attach": [{"policy": "p", "fleet": "*"}],
        }
    )  # fmt: skip
    compiled = PolicySet(document).for_subject(subject())
    allowed = ["/0/x", "/3/", "a0", "a2/b/c", "b/x", "/x", "a1/secret/deeper"]
    denied = ["/4/x", "/0", "a1/secret", "b/y", "$SYS/x", "zz", "/0/x/y"]
    for topic in allowed * 2:  # twice: the indexes are built on first use
        assert compiled.decide(PUB, topic).allowed, topic
    for topic in denied * 2:
        assert not compiled.decide(PUB, topic).allowed, topic


def test_a_snapshot_without_documents_decides_with_the_built_in_default() -> None:
    """Groups, attributes and enrollments bump the version before any `policy apply`: the
    gateway and explain must then use the built-in default, not deny everything."""
    from gateway.policy_live import state_from_snapshot
    from schemas.policy_store import PolicySnapshot

    snapshot = PolicySnapshot(version=7, groups={"d1": frozenset({"line-a"})})
    policy = PolicySet.from_snapshot(snapshot)
    compiled = policy.for_subject(
        Subject(device_id="d1", fleet="plant", groups=frozenset({"line-a"}))
    )
    assert compiled.decide(Action.PUBLISH, "devices/d1/temp").allowed
    assert not compiled.decide(Action.PUBLISH, "devices/d2/temp").allowed
    assert compiled.decide(Action.PUBLISH, "devices/d1/temp").version == 7
    assert state_from_snapshot(snapshot).policies is not None
