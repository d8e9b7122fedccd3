"""Receive Maximum both ways: the client's (the broker holds back QoS 1 deliveries) and the
server's (3 here, from `max_inflight_messages`: PUBLISHes beyond it are refused)."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes

from tests.gateway.conftest import Device
from tests.mqtt5 import wire as w
from tests.mqtt5.clients import Paho, connected, make_props, wire
from tests.mqtt5.conftest import Side, differential


def test_client_receive_maximum_holds_deliveries(sides: tuple[Side, Side], device: Device) -> None:
    """A subscriber with Receive Maximum 2 that acknowledges nothing gets two QoS 1
    messages; its PUBACKs let the rest through, in order."""
    topic = f"devices/{device.device_id}/flow"

    def run(side: Side) -> list[object]:
        receive_max = make_props(PacketTypes.CONNECT, ReceiveMaximum=2)
        subscriber = Paho(side, device, properties=receive_max, manual_ack=True)
        out: list[object] = [subscriber.next(), subscriber.subscribe(topic, qos=1)]
        publisher = connected(Paho(side, device, f"{device.device_id}-pub"))
        out += [publisher.publish(topic, b"m%d" % i, qos=1) for i in range(5)]
        out.append(subscriber.quiet(0.5))  # held back: two in flight
        for i in range(3):
            subscriber.client.ack(subscriber.messages[i].mid, 1)
            out.append(subscriber.quiet(0.3))  # exactly one more per PUBACK
        for msg in subscriber.messages[3:]:
            subscriber.client.ack(msg.mid, 1)
        subscriber.disconnect()
        publisher.disconnect()
        return out

    direct, gateway = differential(sides, run)
    assert direct[0] == ("connack", 0, False, {"TopicAliasMaximum": 10, "ReceiveMaximum": 3})
    delivered = [("message", topic, b"m%d" % i, 1, False, {}) for i in range(5)]
    held, *released = direct[7:]
    assert held == delivered[:2]
    # Released in order as PUBACKs come. Mosquitto 2.0.11 lets two through after the first
    # PUBACK (three in flight for a Receive Maximum of 2): its quirk, seen the same way
    # through the gateway, which forwards the Receive Maximum and the PUBACKs untouched.
    assert [m for batch in released for m in batch] == delivered[2:]  # type: ignore[attr-defined]
    assert gateway == direct


def test_server_receive_maximum(sides: tuple[Side, Side], device: Device) -> None:
    """The broker's Receive Maximum (3) reaches the client in CONNACK; paho keeps within
    it on its own; QoS 2 PUBLISHes beyond it, all sent at once, are refused with PUBREC
    0x97 (Quota exceeded) as Mosquitto does it, and the rest complete."""
    topic = f"devices/{device.device_id}/quota"

    def run(side: Side) -> list[object]:
        subscriber = connected(Paho(side, device, f"{device.device_id}-sub"))
        subscriber.subscribe(topic, qos=1)
        publisher = connected(Paho(side, device, f"{device.device_id}-pub"))
        infos = [publisher.client.publish(topic, b"p%d" % i, qos=1) for i in range(8)]
        for info in infos:
            info.wait_for_publish(5)
        out: list[object] = [[info.rc for info in infos], subscriber.take(8)]
        client = wire(side, device)
        client.send(w.connect(device.device_id))
        assert client.recv() is not None
        client.send(*(w.publish(topic, b"r%d" % i, qos=2, packet_id=i) for i in range(1, 6)))
        out.append(client.recv_all())
        client.send(*(w.ack(w.PUBREL, i) for i in range(1, 6)))
        out.append(client.recv_all())
        out.append(sorted(subscriber.quiet(0.3)))
        client.send(w.disconnect())
        client.close()
        for paho_client in (subscriber, publisher):
            paho_client.disconnect()
        return out

    direct, gateway = differential(sides, run)
    assert direct[1] == [("message", topic, b"p%d" % i, 1, False, {}) for i in range(8)]
    assert ("PUBREC", 0, b"\x00\x04\x97") in direct[2]  # type: ignore[operator]
    assert gateway == direct
