"""Refusals end to end: each answered with the protocol's own code, and recorded."""

from __future__ import annotations

import json
import ssl

import pytest

from gateway.mqtt import (
    Connack,
    Disconnect,
    Puback,
    Publish,
    Pubrec,
    Suback,
    Subscribe,
    Subscription,
)
from gateway.upstream import UpstreamTarget
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness
from tests.helpers import free_port


@pytest.mark.parametrize(("version", "code"), [(4, 0x02), (5, 0x85)])
def test_another_devices_client_id(
    harness: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    device, other = make_device("me"), make_device("other")
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=version) as client:
        assert client.connect(other.device_id).reason_code == code
        assert client.closed()
    (row,) = harness.wait_events(after=mark, type="connect")
    assert (row["reason"], row["device_id"], row["client_id"]) == (
        "client_id_mismatch",
        device.device_id,
        other.device_id,
    )


@pytest.mark.parametrize(("version", "code"), [(4, 0x80), (5, 0x87)])
def test_forbidden_subscriptions(
    harness: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    device = make_device("sub")
    mine = f"devices/{device.device_id}/#"
    filters = ["#", mine, "devices/+/telemetry", "$SYS/#"]
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id).reason_code == 0
        subscriptions = tuple(Subscription(topic_filter=f, qos=1) for f in filters)
        client.send(Subscribe(packet_id=5, subscriptions=subscriptions))
        suback = client.recv()
        assert isinstance(suback, Suback)
        assert (suback.packet_id, suback.reason_codes) == (5, (code, 1, code, code))
        # The granted one really is live at the broker: a message comes back.
        client.send(
            Publish(topic=f"devices/{device.device_id}/x", payload=b"ok", qos=1, packet_id=6)
        )
        got = {type(client.recv()), type(client.recv())}
        assert got == {Puback, Publish}
        # All denied: answered by the gateway itself.
        client.send(Subscribe(packet_id=7, subscriptions=(Subscription(topic_filter="#"),)))
        assert client.recv() == Suback(packet_id=7, reason_codes=(code,))
    rows = harness.wait_events(2, after=mark, type="subscribe")  # one per SUBSCRIBE
    details = [json.loads(r["detail"]) for r in rows]
    assert [(d["count"], d["filters"]) for d in details] == [
        (3, ["#", "devices/+/telemetry", "$SYS/#"]),
        (1, ["#"]),
    ]
    assert {(r["outcome"], r["reason"]) for r in rows} == {("denied", "topic_not_authorized")}


@pytest.mark.parametrize(("qos", "reply"), [(1, Puback), (2, Pubrec)])
def test_publish_to_another_device_v5(
    harness: Harness, make_device: DeviceFactory, qos: int, reply: type
) -> None:
    device = make_device("pub5")
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send(Publish(topic="devices/someone-else/cmd", payload=b"x", qos=qos, packet_id=3))
        assert client.recv() == reply(packet_id=3, reason_code=0x87)
        client.send(
            Publish(topic=f"devices/{device.device_id}/x", payload=b"y", qos=1, packet_id=4)
        )
        ack = client.recv()  # the session goes on (0x10: no matching subscribers)
        assert isinstance(ack, Puback) and ack.packet_id == 4 and ack.reason_code < 0x80
    (row,) = harness.wait_events(after=mark, type="publish")
    assert (row["outcome"], row["reason"]) == ("denied", "topic_not_authorized")
    assert json.loads(row["detail"])["topic"] == "devices/someone-else/cmd"


def test_publish_to_another_device_v311_closes(
    harness: Harness, make_device: DeviceFactory
) -> None:
    device = make_device("pub3")
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=4) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send(Publish(topic="devices/someone-else/cmd", payload=b"x", qos=1, packet_id=3))
        assert client.closed()
    rows = harness.wait_events(3, after=mark, device_id=device.device_id)
    assert [(r["type"], r["reason"]) for r in rows[1:]] == [
        ("publish", "topic_not_authorized"),
        ("session_end", "topic_not_authorized"),
    ]


def test_lenient_fleet_drops_denied_v311_publish(
    harness: Harness, make_device: DeviceFactory
) -> None:
    device = make_device("lenient", fleet="lenient")
    with RawClient(harness.port, device, device.chain, version=4) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send(Publish(topic="devices/x/cmd", payload=b"x", qos=1, packet_id=3))
        assert client.recv() == Puback(packet_id=3)


def test_malformed_packet_closes_only_that_session(
    harness: Harness, make_device: DeviceFactory
) -> None:
    good, bad = make_device("good"), make_device("bad")
    topic = f"devices/{good.device_id}/t"
    mark = harness.mark()
    with RawClient(harness.port, good, good.chain, version=5) as bystander:
        assert bystander.connect(good.device_id).reason_code == 0
        bystander.send(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic),)))
        assert isinstance(bystander.recv(), Suback)
        with RawClient(harness.port, bad, bad.chain, version=5) as client:
            assert client.connect(bad.device_id).reason_code == 0
            client.send_bytes(b"\x00\x03abc")  # packet type 0 is reserved
            assert client.recv() == Disconnect(reason_code=0x81)
            assert client.closed()
        bystander.send(Publish(topic=topic, payload=b"still here"))
        message = bystander.recv()
        assert isinstance(message, Publish) and message.payload == b"still here"
    (row,) = harness.wait_events(after=mark, device_id=bad.device_id, type="session_end")
    assert (row["outcome"], row["reason"]) == ("denied", "protocol_error")


def test_malformed_packet_v311_just_closes(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("bad3")
    mark = harness.mark()
    with RawClient(harness.port, device, device.chain, version=4) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send_bytes(b"\x82\x05\x00\x01\x00\x01#")  # SUBSCRIBE without its options byte
        assert client.closed()
    (row,) = harness.wait_events(after=mark, device_id=device.device_id, type="session_end")
    assert row["reason"] == "protocol_error"


@pytest.mark.parametrize(("version", "code"), [(4, 0x03), (5, 0x88)])
def test_upstream_unavailable(
    harness: Harness, make_device: DeviceFactory, version: int, code: int
) -> None:
    gateway = harness.start_gateway(upstream=UpstreamTarget("127.0.0.1", free_port()))
    try:
        device = make_device("noup")
        mark = harness.mark()
        with RawClient(gateway.port, device, device.chain, version=version) as client:
            assert client.connect(device.device_id) == Connack(reason_code=code)
            assert client.closed()
        (row,) = harness.wait_events(after=mark, type="connect")
        assert row["reason"] == "upstream_unavailable"
    finally:
        harness.call(gateway.close())


def test_session_takeover(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("twin")
    with RawClient(harness.port, device, device.chain, version=5) as first:
        assert first.connect(device.device_id).reason_code == 0
        with RawClient(harness.port, device, device.chain, version=5) as second:
            assert second.connect(device.device_id).reason_code == 0
            assert first.recv() == Disconnect(reason_code=0x8E)
            assert first.closed()
    rows = harness.wait_events(2, device_id=device.device_id, type="session_end")
    assert [r["reason"] for r in rows] == ["session_taken_over", "connection_lost"]


def test_unrecorded_sessions_are_refused(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("nolog")
    harness.sink.fail = True
    try:
        with RawClient(harness.port, device, device.chain, version=5) as client:
            assert client.connect(device.device_id) == Connack(reason_code=0x88)
    finally:
        harness.sink.fail = False


def test_tls12_client_works(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("tls12")
    with RawClient(
        harness.port, device, device.chain, tls_version=ssl.TLSVersion.TLSv1_2
    ) as client:
        assert client.connect(device.device_id).reason_code == 0
        assert client.sock.version() == "TLSv1.2"
        assert "ECDHE" in client.sock.cipher()[0]  # type: ignore[index]
    (row,) = harness.wait_events(device_id=device.device_id, type="connect")
    assert row["tls_version"] == "TLSv1.2"
