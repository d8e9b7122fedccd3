"""A per-fleet policy file imports as-is: the statement evaluator decides every request as
the evaluator of earlier releases did (tests/gateway/policy_v1.py, a frozen copy).

Policies: the built-in default, the Kubernetes ConfigMap's, the examples of
docs/policy.md and test_policy_cli.py, and the test harnesses' policies. Requests:
generated topics and filters ($share and $SYS included) and client ids, for ordinary and
hostile device ids. One documented difference is excluded: a device id or fleet starting
with ``$`` (no certificate can carry one: ids are ``[a-z0-9][a-z0-9-]*``) now expands to
nothing; and for client ids only ids the gateway can see are compared (see below).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy import Action, compile_for
from schemas.policy import FleetPolicy, PolicyDocument
from tests.gateway import policy_v1
from tests.gateway.conftest import TEST_POLICY
from tests.gateway.test_policy_cli import POLICY as CLI_POLICY
from tests.mqtt5.conftest import SUITE_POLICY

ROOT = Path(__file__).resolve().parents[2]


def _docs_example() -> PolicyDocument:
    text = (ROOT / "docs" / "policy.md").read_text()
    block = re.search(r"```toml\n(# /etc/devicegate/policy.toml\n.*?)```", text, re.DOTALL)
    assert block is not None, "docs/policy.md lost its per-fleet example"
    return PolicyDocument.model_validate(tomllib.loads(block.group(1)))


def _configmap() -> PolicyDocument:
    path = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
    for manifest in yaml.safe_load_all(path.read_text()):
        if manifest and manifest["metadata"]["name"] == "devicegate-policy":
            return PolicyDocument.model_validate(tomllib.loads(manifest["data"]["policy.toml"]))
    raise AssertionError("the ConfigMap devicegate-policy is gone")


SYS_AND_WIDE = PolicyDocument(
    default=FleetPolicy(publish=(), subscribe=("$SYS/broker/clients/+", "+/+/status")),
    fleets={
        "lab": FleetPolicy(
            publish=("labs/{fleet}/{device_id}/+", "shared/#"),
            subscribe=("#", "labs/+/{device_id}"),
            client_ids=("*",),
            drop_denied_publish_v3=True,
        ),
        "plant": FleetPolicy(client_ids=("{fleet}-{device_id}", "{device_id}-*"), subscribe=()),
    },
)

DOCUMENTS = {
    "built-in": PolicyDocument(),
    "configmap": _configmap(),
    "docs": _docs_example(),
    "cli-example": PolicyDocument.model_validate(tomllib.loads(CLI_POLICY)),
    "gateway-tests": TEST_POLICY,
    "mqtt5-tests": SUITE_POLICY,
    "sys-and-wide": SYS_AND_WIDE,
}


@dataclass(frozen=True)
class Who:
    device_id: str
    fleet: str


LEVELS = [
    "devices", "fleets", "labs", "plant", "line-a", "lab", "shared", "in", "status",
    "telemetry", "d1", "d2", "x", "$SYS", "broker", "clients", "", "d1-x",
]  # fmt: skip
FLEETS = ["plant", "line-a", "lab", "bench", "wide", "lenient", "mqtt5", "other"]
DEVICES = ["d1", "d2", "x", "d1-x"]
HOSTILE = ["+", "#", "a/b", "", "d1/#", "x\x00"]

topic_names = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=5).map("/".join).filter(bool)
topic_filters = st.builds(
    lambda levels, tail: "/".join(levels + tail),
    st.lists(st.sampled_from([*LEVELS, "+"]), min_size=0, max_size=4),
    st.sampled_from([[], [], ["#"], ["+"]]),
).filter(bool)
subscribe_requests = topic_filters | topic_filters.map(lambda f: f"$share/g/{f}") | topic_names
who = st.builds(Who, st.sampled_from(DEVICES + HOSTILE), st.sampled_from(FLEETS + HOSTILE))


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
@settings(max_examples=150, deadline=None)
@given(
    subject=who,
    topics=st.lists(topic_names, max_size=6),
    subs=st.lists(subscribe_requests, max_size=6),
)
def test_publish_and_subscribe_decide_as_before(
    name: str, subject: Who, topics: list[str], subs: list[str]
) -> None:
    document = DOCUMENTS[name]
    old = document.for_fleet(subject.fleet)
    new = compile_for(document, subject)
    assert not new.publish_flags_matter  # retain and QoS change nothing, as before
    assert new.drop_denied_publish_v3 is old.drop_denied_publish_v3
    for topic in topics:
        want = policy_v1.authorize(subject, policy_v1.Action.PUBLISH, topic, old).allowed
        for qos, retain in ((0, False), (1, True), (2, False)):
            got = new.decide(Action.PUBLISH, topic, qos=qos, retain=retain)
            assert got.allowed is want, (name, subject, topic, qos, retain)
    for requested in subs:
        want = policy_v1.authorize(subject, policy_v1.Action.SUBSCRIBE, requested, old).allowed
        assert new.decide(Action.SUBSCRIBE, requested).allowed is want, (name, subject, requested)


CLIENT_IDS = ["d1", "d2", "d1-x", "d1-", "d10", "plant-d1", "lab-d1", "x", "", "*", "d1:x"]


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_client_ids_decide_as_before(name: str) -> None:
    """Every device id and fleet a certificate can carry (no '+', '#', '/' or '*' in one);
    a hostile id is compared for topics above, where it matters."""
    document = DOCUMENTS[name]
    for device_id in DEVICES:
        for fleet in FLEETS:
            subject = Who(device_id, fleet)
            old = document.for_fleet(fleet)
            new = compile_for(document, subject)
            for client_id in CLIENT_IDS:
                want = policy_v1.client_id_allowed(subject, client_id, old)
                assert new.client_id_allowed(client_id) is want, (name, subject, client_id)


def test_every_shipped_example_is_covered() -> None:
    """The docs example and the ConfigMap are real files: the test reads them, not copies."""
    assert _docs_example().fleets, "the docs example names a fleet"
    assert _configmap() == PolicyDocument(), "the ConfigMap ships the built-in default"
