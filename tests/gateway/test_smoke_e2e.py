from __future__ import annotations

import socket

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


def test_both_sockets_of_a_session_have_nodelay(
    harness: Harness, make_device: DeviceFactory
) -> None:
    """The bridge relies on the event loop for TCP_NODELAY (else Nagle delays CONNACKs)."""
    device = make_device()
    with RawClient(harness.port, device, device.chain) as client:
        assert client.connect(device.device_id) == Connack(reason_code=0)

        async def flags() -> list[tuple[int, int]]:
            found = []
            for connection in harness.gateway.connections:
                assert connection.transport is not None and connection.upstream is not None
                found.append(
                    tuple(
                        transport.get_extra_info("socket").getsockopt(
                            socket.IPPROTO_TCP, socket.TCP_NODELAY
                        )
                        for transport in (connection.transport, connection.upstream)
                    )
                )
            return found

        assert [bool(a) and bool(b) for a, b in harness.call(flags())] == [True]
