from __future__ import annotations

from gateway.mqtt import Connack, Publish, Suback, Subscribe, Subscription
from tests.gateway.clients import RawClient
from tests.gateway.conftest import DeviceFactory, Harness


def test_raw_round_trip(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device()
    with RawClient(harness.port, device, device.chain) as client:
        connack = client.connect(device.device_id)
        assert connack == Connack(reason_code=0)
        topic = f"devices/{device.device_id}/t"
        client.send(
            Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic, qos=1),))
        )
        assert client.recv() == Suback(packet_id=1, reason_codes=(1,))
        client.send(Publish(topic=topic, payload=b"hi"))
        message = client.recv()
        assert isinstance(message, Publish) and message.payload == b"hi"
    rows = harness.wait_events(device_id=device.device_id, type="connect")
    assert rows[0]["outcome"] == "allowed"
