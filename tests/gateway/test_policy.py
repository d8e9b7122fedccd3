"""The topic policy is a pure function: table-driven tests of the per-fleet format, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.policy import (
    DEFAULT_DENY,
    Action,
    PolicyError,
    Subject,
    compile_for,
    expand_resource,
    load_policy,
)
from schemas.events import Reason
from schemas.policy import FleetPolicy, PolicyDocument

DEFAULT = FleetPolicy()
PUB, SUB = Action.PUBLISH, Action.SUBSCRIBE


@dataclass(frozen=True)
class Who:
    device_id: str
    fleet: str


D1 = Who("d1", "plant")


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        (PUB, "devices/d1/telemetry", True),
        (PUB, "devices/d1", True),  # '#' covers the parent level
        (PUB, "devices/d1/a/b/c", True),
        (PUB, "devices/d2/telemetry", False),
        (PUB, "devices/d10/telemetry", False),
        (PUB, "fleets/plant/x", False),  # fleet topics are subscribe-only
        (PUB, "$SYS/broker/uptime", False),
        (PUB, "devices/+/x", False),  # wildcards are never topic names
        (SUB, "devices/d1/#", True),
        (SUB, "devices/d1/+", True),
        (SUB, "devices/d1/+/x", True),
        (SUB, "fleets/plant/#", True),
        (SUB, "fleets/other/#", False),
        (SUB, "#", False),
        (SUB, "+/#", False),
        (SUB, "devices/+/telemetry", False),
        (SUB, "devices/#", False),
        (SUB, "$SYS/#", False),
        (SUB, "$share/g1/devices/d1/#", True),
        (SUB, "$share/g1/devices/+/x", False),
        (SUB, "$share/g1/#", False),
        (SUB, "devices/d1/#/x", False),  # invalid filter
        (SUB, "", False),
    ],
)
def test_default_policy(action: Action, topic: str, allowed: bool) -> None:
    decision = compile_for(DEFAULT, D1).decide(action, topic)
    assert decision.allowed is allowed
    assert decision.reason is (Reason.OK if allowed else Reason.TOPIC_NOT_AUTHORIZED)
    want = f"default/{action.value}" if allowed else DEFAULT_DENY
    assert decision.statement == want


@pytest.mark.parametrize("device_id", ["+", "#", "a/b", "", "x\x00", "d1/#"])
def test_unsafe_identity_never_widens(device_id: str) -> None:
    who = Who(device_id, "plant")
    assert expand_resource("devices/{device_id}/#", Subject(device_id, "plant")) is None
    policy = compile_for(DEFAULT, who)
    for topic in ("devices/d2/x", "devices/a/b", "devices/x"):
        assert not policy.decide(PUB, topic).allowed
    assert not policy.decide(SUB, "devices/#").allowed
    # the fleet template is unaffected by a bad device id, and vice versa
    assert policy.decide(SUB, "fleets/plant/a").allowed
    assert not compile_for(DEFAULT, Who("d1", "+")).decide(SUB, "fleets/x/a").allowed


def test_custom_templates_and_fleet_overrides() -> None:
    document = PolicyDocument(
        fleets={"lab": FleetPolicy(publish=("labs/{fleet}/{device_id}/+",), subscribe=("$SYS/#",))}
    )
    lab = compile_for(document, Who("d1", "lab"))
    assert lab.decide(PUB, "labs/lab/d1/x").allowed
    assert not lab.decide(PUB, "labs/lab/d1/x/y").allowed
    assert lab.decide(SUB, "$SYS/broker/#").allowed
    assert not lab.decide(SUB, "devices/d1/#").allowed  # the fleet's own replaces default
    plant = compile_for(document, Who("d1", "plant"))
    assert plant.decide(SUB, "devices/d1/#").allowed
    assert not plant.decide(PUB, "labs/plant/d1/x").allowed


@pytest.mark.parametrize(
    ("templates", "client_id", "allowed"),
    [
        (("{device_id}",), "d1", True),
        (("{device_id}",), "d2", False),
        (("{device_id}",), "d1-x", False),
        (("{device_id}-*",), "d1-x", True),
        (("{device_id}-*",), "d1", False),
        (("{device_id}-*",), "d10", False),
        (("*",), "anything", True),
        (("{fleet}-{device_id}",), "plant-d1", True),
    ],
)
def test_client_ids(templates: tuple[str, ...], client_id: str, allowed: bool) -> None:
    policy = compile_for(FleetPolicy(client_ids=templates), D1)
    assert policy.client_id_allowed(client_id) is allowed


def test_load_policy(tmp_path: Path) -> None:
    assert load_policy(None) == PolicyDocument()
    toml = tmp_path / "policy.toml"
    toml.write_text('[fleets.lab]\npublish = ["labs/{device_id}/#"]\nclient_ids = ["*"]\n')
    document = load_policy(toml)
    assert isinstance(document, PolicyDocument)
    assert document.for_fleet("lab").publish == ("labs/{device_id}/#",)
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps({"default": {"subscribe": ["fleets/{fleet}/#"]}}))
    loaded = load_policy(as_json)
    assert isinstance(loaded, PolicyDocument)
    assert loaded.default.subscribe == ("fleets/{fleet}/#",)


@pytest.mark.parametrize(
    "text",
    [
        '[fleets.lab]\npublish = ["labs/#/x"]\n',  # invalid filter
        "[fleets.lab]\nunknown = 1\n",
        "not toml at all [",
    ],
)
def test_load_policy_refuses_invalid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError):
        load_policy(path)
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "missing.toml")
