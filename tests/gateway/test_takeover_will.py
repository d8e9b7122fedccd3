"""Takeover and the will (issue 18): a taken-over session's broker connection is left for
the broker's own takeover to close, so the broker decides about the will as it would
without the gateway. The differential cases are in tests/mqtt5/test_will_session.py; here,
the bound on that hand-over when no successor reaches the broker."""

from __future__ import annotations

import queue
from typing import Any

import paho.mqtt.client as paho
import pytest

from gateway.mqtt import Disconnect, Will
from schemas.events import Reason
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness


def _watch(port: int, topic: str) -> tuple[Any, queue.Queue[Any]]:
    """A client straight on the broker, subscribed to ``topic``."""
    inbox: queue.Queue[Any] = queue.Queue()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_message = lambda c, u, msg: inbox.put(msg)
    client.on_subscribe = lambda c, u, mid, codes, props: inbox.put("subscribed")
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    assert inbox.get(timeout=5) == "subscribed"
    return client, inbox


def test_taken_over_upstream_is_closed_after_the_handover(
    harness: Harness, make_device: DeviceFactory
) -> None:
    """Taken over by a session that never reaches the broker (a notice from another worker
    whose dial then fails): the device gets DISCONNECT 0x8E at once, the broker connection
    stays open for the hand-over (dial timeout + 1 s) and is then closed, so the will
    fires only then."""
    gateway = harness.start_gateway(dial_timeout=0.5)  # hand-over: 1.5 s
    device = make_device("handover")
    topic = f"devices/{device.device_id}/status"
    watcher, inbox = _watch(harness.mosquitto_port, topic)
    try:
        with RawClient(gateway.port, device, device.chain, version=5) as client:
            will = Will(topic=topic, payload=b"gone", qos=1)
            assert client.connect(device.device_id, will=will).reason_code == 0
            (connection,) = [
                c
                for c in list(gateway.connections)
                if c.session is not None and c.session.client_id == device.device_id
            ]
            harness.loop.call_soon_threadsafe(connection.kick, Reason.SESSION_TAKEN_OVER)
            assert client.recv() == Disconnect(reason_code=0x8E)
            assert client.closed()
            with pytest.raises(queue.Empty):  # the broker connection is held meanwhile
                inbox.get(timeout=0.7)
            message = inbox.get(timeout=5)
            assert (message.topic, message.payload) == (topic, b"gone")
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        harness.call(gateway.close())
