"""Real MQTT clients through the gateway to a real Mosquitto: aiomqtt, paho, mosquitto_*."""

from __future__ import annotations

import asyncio
import queue
import socket
import subprocess
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest

from gateway.mqtt import Pingreq, Pingresp, Will
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness

V311, V5 = paho.MQTTv311, paho.MQTTv5


@pytest.mark.parametrize(
    "protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5], ids=["311", "5"]
)
async def test_aiomqtt_round_trip_qos_0_1_2(
    harness: Harness, make_device: DeviceFactory, protocol: aiomqtt.ProtocolVersion
) -> None:
    device = make_device("aio")
    topic = f"devices/{device.device_id}/telemetry"
    async with aiomqtt.Client(
        "127.0.0.1",
        harness.port,
        identifier=device.device_id,
        protocol=protocol,
        tls_context=client_context(device, device.chain),
        timeout=5,
    ) as client:
        await client.subscribe(f"devices/{device.device_id}/#", qos=2)
        for qos in (0, 1, 2):
            await client.publish(topic, f"m{qos}".encode(), qos=qos)
        received: list[tuple[bytes, int]] = []
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                received.append((message.payload, message.qos))
                if len(received) == 3:
                    break
    assert sorted(received) == [(b"m0", 0), (b"m1", 1), (b"m2", 2)]


def _paho(
    device: Device, port: int, protocol: int, client_id: str | None = None, will: str = ""
) -> Any:
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id if client_id is not None else device.device_id,
        protocol=protocol,
    )
    if will:
        client.will_set(will, b"offline", qos=1)
    client.tls_set_context(client_context(device, device.chain))
    inbox: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, flags, rc, props: inbox.put(("connack", rc))
    client.on_subscribe = lambda c, u, mid, codes, props: inbox.put(("suback", list(codes)))
    client.on_publish = lambda c, u, mid, rc, props: inbox.put(("puback", rc))
    client.on_message = lambda c, u, msg: inbox.put(("message", msg))
    client.on_disconnect = lambda c, u, flags, rc, props: inbox.put(("disconnect", rc))
    client.inbox = inbox  # type: ignore[attr-defined]
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def _next(client: Any, kind: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got, value = client.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        if got == kind:
            return value


@pytest.mark.parametrize("protocol", [V311, V5], ids=["311", "5"])
def test_paho_round_trip_and_retained(
    harness: Harness, make_device: DeviceFactory, protocol: int
) -> None:
    device = make_device("paho")
    base = f"devices/{device.device_id}"
    client = _paho(device, harness.port, protocol)
    try:
        assert _next(client, "connack") == 0
        client.subscribe(f"{base}/#", qos=2)
        assert [c.value for c in _next(client, "suback")] == [2]
        for qos in (0, 1, 2):
            client.publish(f"{base}/t", f"p{qos}".encode(), qos=qos)
        messages = [_next(client, "message") for _ in range(3)]
        assert sorted((m.payload, m.qos) for m in messages) == [(b"p0", 0), (b"p1", 1), (b"p2", 2)]
        client.publish(f"{base}/state", b"on", qos=1, retain=True)
        assert _next(client, "message").payload == b"on"
    finally:
        client.disconnect()
        client.loop_stop()
    # A new session gets the retained message, flagged as retained.
    again = _paho(device, harness.port, protocol)
    try:
        assert _next(again, "connack") == 0
        again.subscribe(f"{base}/state", qos=1)
        message = _next(again, "message")
        assert (message.payload, message.retain) == (b"on", True)
    finally:
        again.disconnect()
        again.loop_stop()
    rows = harness.wait_events(2, device_id=device.device_id, type="session_end")
    assert [r["reason"] for r in rows] == ["client_disconnected", "client_disconnected"]


def _mosquitto_args(harness: Harness, device: Device, version: str, client_id: str) -> list[str]:
    return [
        "-h", "127.0.0.1", "-p", str(harness.port), "--cafile", str(device.chain),
        "--cert", str(device.cert), "--key", str(device.key), "-V", version, "-i", client_id,
    ]  # fmt: skip


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients(harness: Harness, make_device: DeviceFactory, version: str) -> None:
    device = make_device("mosq", fleet="bench")  # bench: client ids "<device>-*"
    base = f"devices/{device.device_id}"
    mark = harness.mark()
    sub = subprocess.Popen(
        ["mosquitto_sub", *_mosquitto_args(harness, device, version, f"{device.device_id}-sub"),
         "-t", f"{base}/#", "-q", "2", "-C", "4", "-W", "10", "-F", "%r %q %t %p"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    harness.wait_events(after=mark, device_id=device.device_id, type="connect")
    # Wait until the broker's SUBACK has gone through to mosquitto_sub.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
        c.session
        and c.session.client_id == f"{device.device_id}-sub"
        and c.session.downstream.packets
        for c in list(harness.gateway.connections)
    ):
        time.sleep(0.01)
    for qos in (0, 1, 2):
        subprocess.run(
            ["mosquitto_pub", *_mosquitto_args(harness, device, version, f"{device.device_id}-p"),
             "-t", f"{base}/t", "-q", str(qos), "-m", f"q{qos}"],
            check=True, timeout=10,
        )  # fmt: skip
    subprocess.run(
        ["mosquitto_pub", *_mosquitto_args(harness, device, version, f"{device.device_id}-p"),
         "-t", f"{base}/r", "-q", "1", "-r", "-m", "kept"],
        check=True, timeout=10,
    )  # fmt: skip
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert sorted(out.splitlines()) == sorted(
        [f"0 0 {base}/t q0", f"0 1 {base}/t q1", f"0 2 {base}/t q2", f"0 1 {base}/r kept"]
    )
    retained = subprocess.run(
        ["mosquitto_sub", *_mosquitto_args(harness, device, version, f"{device.device_id}-r"),
         "-t", f"{base}/r", "-C", "1", "-W", "5", "-F", "%r %p"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert retained.stdout.strip() == "1 kept"


def _broker_subscriber(harness: Harness, topic: str) -> Any:
    """A client straight on Mosquitto (no gateway): sees what the gateway let through."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=V311)
    inbox: queue.Queue[Any] = queue.Queue()
    client.on_message = lambda c, u, msg: inbox.put(msg)
    client.on_subscribe = lambda c, u, mid, codes, props: inbox.put("subscribed")
    client.inbox = inbox  # type: ignore[attr-defined]
    client.connect("127.0.0.1", harness.mosquitto_port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    assert inbox.get(timeout=5) == "subscribed"
    return client


@pytest.mark.parametrize("version", [4, 5])
def test_will_fires_when_the_device_drops(
    harness: Harness, make_device: DeviceFactory, version: int
) -> None:
    device = make_device("will")
    topic = f"devices/{device.device_id}/status"
    watcher = _broker_subscriber(harness, topic)
    try:
        client = RawClient(harness.port, device, device.chain, version=version)
        will = Will(topic=topic, payload=b"offline", qos=1)
        assert client.connect(device.device_id, will=will).reason_code == 0
        client.sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the device just vanishes
        client.close()
        message = watcher.inbox.get(timeout=5)
        assert (message.topic, message.payload) == (topic, b"offline")
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    (row,) = harness.wait_events(device_id=device.device_id, type="session_end")
    assert row["reason"] == "connection_lost"


def test_clean_disconnect_sends_no_will(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("nowill")
    topic = f"devices/{device.device_id}/status"
    watcher = _broker_subscriber(harness, topic)
    try:
        client = _paho(device, harness.port, V311, will=topic)
        assert _next(client, "connack") == 0
        client.disconnect()
        client.loop_stop()
        (row,) = harness.wait_events(device_id=device.device_id, type="session_end")
        assert row["reason"] == "client_disconnected"
        with pytest.raises(queue.Empty):
            watcher.inbox.get(timeout=0.3)
    finally:
        watcher.loop_stop()
        watcher.disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_keepalive_pingreq_is_answered(
    harness: Harness, make_device: DeviceFactory, version: int
) -> None:
    device = make_device("ping")
    with RawClient(harness.port, device, device.chain, version=version) as client:
        assert client.connect(device.device_id, keepalive=5).reason_code == 0
        for _ in range(3):
            client.send(Pingreq())
            assert client.recv() == Pingresp()


async def test_aiomqtt_v5_sees_the_refusal_codes(
    harness: Harness, make_device: DeviceFactory
) -> None:
    device = make_device("aiodeny")
    async with aiomqtt.Client(
        "127.0.0.1",
        harness.port,
        identifier=device.device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=client_context(device, device.chain),
        timeout=5,
    ) as client:
        for topic_filter in ("#", "devices/+/telemetry", "$SYS/#"):
            codes = await client.subscribe(topic_filter, qos=1)
            assert [getattr(c, "value", c) for c in codes] == [0x87]
        codes = await client.subscribe(f"devices/{device.device_id}/#", qos=1)
        assert [getattr(c, "value", c) for c in codes] == [1]


def test_paho_v311_sees_suback_failure(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("pahodeny")
    client = _paho(device, harness.port, V311)
    try:
        assert _next(client, "connack") == 0
        client.subscribe([("#", 0), (f"devices/{device.device_id}/#", 1), ("$SYS/#", 0)])
        assert [c.value for c in _next(client, "suback")] == [0x80, 1, 0x80]
    finally:
        client.disconnect()
        client.loop_stop()
