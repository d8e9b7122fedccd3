"""A new policy version re-judges live sessions: a subscription it forbids is removed at the
broker (UNSUBSCRIBE upstream), the device is told (MQTT 5 DISCONNECT 0x87 naming the
filter) or its session ends (3.1.1), and each effect is an event.

End to end: real Mosquitto, real TLS clients on certificates from the project's CA, real
PostgreSQL for the events; the new version is handed to the gateway as the follower would
(`Gateway.policy_changed`). The database path (NOTIFY) is tests/gateway/test_policy_follow.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from gateway.mqtt import Connack, Disconnect, Publish, Suback, Subscribe
from gateway.mqtt.packets import Puback, Subscription
from gateway.mqtt.properties import Properties, PropertyId
from gateway.policy_live import state_from_document
from gateway.server import Gateway
from schemas.policy import FleetPolicy, PolicyDocument
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness
from tests.gateway.live import wait_for

NARROWER = PolicyDocument(fleets={"plant": FleetPolicy(subscribe=("devices/{device_id}/#",))})


@pytest.fixture
def gateway(harness: Harness) -> Iterator[Gateway]:
    gateway = harness.start_gateway()
    yield gateway
    harness.call(gateway.close())


def _change(harness: Harness, gateway: Gateway, document: PolicyDocument) -> int:
    version = gateway.policy_state.version + 1

    async def apply() -> None:
        gateway.policy_changed(state_from_document(document, version=version))

    harness.call(apply())
    # Live sessions are re-judged in the background, a moment later.
    wait_for(lambda: gateway.rejudged is not None and gateway.rejudged.version == version)
    return version


def _publish(harness: Harness, topic: str, payload: str) -> None:
    """Straight to the broker, QoS 1 (queued for an offline persistent session)."""
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(harness.mosquitto_port), "-q", "1",
         "-t", topic, "-m", payload, "-i", f"pub-{payload}"],
        check=True, timeout=10,
    )  # fmt: skip


def _persistent(version: int) -> dict[str, object]:
    if version == 5:
        expiry = Properties(((PropertyId.SESSION_EXPIRY_INTERVAL, 300),))
        return {"clean_start": False, "properties": expiry}
    return {"clean_start": False}


@pytest.mark.parametrize("version", [4, 5])
def test_forbidden_subscription_is_unsubscribed_upstream_and_the_session_ends(
    harness: Harness, gateway: Gateway, make_device: DeviceFactory, version: int
) -> None:
    device = make_device("rejudged")
    own, fleet = f"devices/{device.device_id}/#", "fleets/plant/#"
    mark = harness.mark()
    with RawClient(gateway.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id, **_persistent(version)).reason_code == 0
        subscriptions = (
            Subscription(topic_filter=own, qos=1),
            Subscription(topic_filter=fleet, qos=1),
        )
        client.send(Subscribe(packet_id=7, subscriptions=subscriptions))
        assert client.recv() == Suback(packet_id=7, reason_codes=(1, 1))
        policy_version = _change(harness, gateway, NARROWER)
        if version == 5:
            told = client.recv()
            assert isinstance(told, Disconnect) and told.reason_code == 0x87
            assert fleet in (told.properties.reason_string or "")
            assert f"policy version {policy_version}" in (told.properties.reason_string or "")
        assert client.closed()
    # The broker no longer holds the subscription: of two messages queued for the offline
    # session, only the one on the still-allowed filter is delivered when it comes back.
    _publish(harness, "fleets/plant/news", "revoked")
    _publish(harness, f"devices/{device.device_id}/cmd", "kept")
    with RawClient(gateway.port, device, device.chain, version=version) as client:
        connack = client.connect(device.device_id, **_persistent(version))
        assert connack == Connack(
            session_present=True, reason_code=0, properties=connack.properties
        )
        delivered = client.recv()
        assert isinstance(delivered, Publish), delivered
        assert (delivered.topic, bytes(delivered.payload)) == (
            f"devices/{device.device_id}/cmd",
            b"kept",
        )
        client.send(Puback(packet_id=delivered.packet_id or 0))
        with pytest.raises(TimeoutError):
            client.recv(timeout=1.0)  # nothing on fleets/plant/#
        # ... and subscribing to it again is refused by the new policy.
        client.send(
            Subscribe(packet_id=8, subscriptions=(Subscription(topic_filter=fleet, qos=1),))
        )
        assert client.recv() == Suback(packet_id=8, reason_codes=(0x87 if version == 5 else 0x80,))
    rows = harness.wait_events(6, after=mark, device_id=device.device_id)
    effects = [(r["type"], r["outcome"], r["reason"]) for r in rows[:3]]
    assert effects == [
        ("connect", "allowed", "ok"),
        ("subscribe", "denied", "subscription_revoked"),
        ("session_end", "denied", "session_ended_by_policy"),
    ]

    revoked, ended = json.loads(rows[1]["detail"]), json.loads(rows[2]["detail"])
    assert (revoked["filter"], revoked["policy_version"], revoked["statement"]) == (
        fleet,
        policy_version,
        "default-deny",
    )
    assert ended["policy_version"] == policy_version and ended["filters"] == [fleet]


def test_a_session_the_new_policy_still_allows_goes_on(
    harness: Harness, gateway: Gateway, make_device: DeviceFactory
) -> None:
    """Only what the policy forbids ends: a session on its own topics keeps going, and its
    publish decisions are the new policy's."""
    device = make_device("untouched")
    with RawClient(gateway.port, device, device.chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
        own = f"devices/{device.device_id}/in/#"  # allowed before and after
        client.send(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=own),)))
        assert client.recv() == Suback(packet_id=1, reason_codes=(0,))
        forbid_publish = PolicyDocument(
            fleets={"plant": FleetPolicy(publish=("devices/{device_id}/up",))}
        )
        mark = harness.mark()
        version = _change(harness, gateway, forbid_publish)
        topic = f"devices/{device.device_id}/other"
        client.send(Publish(topic=topic, payload=b"x", qos=1, packet_id=3))
        assert client.recv() == Puback(packet_id=3, reason_code=0x87)
        client.send(Publish(topic=f"devices/{device.device_id}/up", qos=1, packet_id=4))
        answer = client.recv()
        assert isinstance(answer, Puback) and answer.reason_code < 0x80  # 0x10: no subscribers
    (row,) = harness.wait_events(after=mark, device_id=device.device_id, type="publish")

    detail = json.loads(row["detail"])
    assert (detail["policy_version"], detail["statement"]) == (version, "default-deny")


def test_a_client_id_the_new_policy_forbids_ends_the_session(
    harness: Harness, gateway: Gateway, make_device: DeviceFactory
) -> None:
    device = make_device("clients", fleet="bench")  # TEST_POLICY: {device_id}-* allowed
    with RawClient(gateway.port, device, device.chain, version=5) as client:
        assert client.connect(f"{device.device_id}-a").reason_code == 0
        mark = harness.mark()
        version = _change(harness, gateway, PolicyDocument())  # bench: {device_id} only
        told = client.recv()
        assert isinstance(told, Disconnect) and told.reason_code == 0x87
        assert "client id" in (told.properties.reason_string or "")
        assert client.closed()
    (row,) = harness.wait_events(after=mark, device_id=device.device_id)
    assert (row["type"], row["reason"]) == ("session_end", "session_ended_by_policy")

    assert json.loads(row["detail"])["policy_version"] == version
