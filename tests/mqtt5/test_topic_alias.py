"""Topic aliases both ways.

Client to broker: an alias set with a topic, used with an empty topic, remapped; an alias
never set (0x82 Protocol error) and one above the broker's Topic Alias Maximum (0x94).
Through the gateway these are judged by the gateway first (it resolves aliases to apply
the topic policy), so its answers must be the broker's.

Broker to client: the client offers a Topic Alias Maximum. Mosquitto 2.0.11 never sends
aliases to clients, so the case shows that the offer passes and full topics arrive.
"""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes

from tests.gateway.conftest import Device
from tests.mqtt5 import wire as w
from tests.mqtt5.clients import Paho, connected, make_props, wire
from tests.mqtt5.conftest import Side, differential


def _alias(alias: int) -> object:
    return make_props(PacketTypes.PUBLISH, TopicAlias=alias)


def test_client_to_broker_aliases(sides: tuple[Side, Side], device: Device) -> None:
    base = f"devices/{device.device_id}/alias"

    def run(side: Side) -> list[object]:
        subscriber = connected(Paho(side, device, f"{device.device_id}-sub"))
        subscriber.subscribe(f"{base}/#", qos=1)
        publisher = connected(Paho(side, device))
        out: list[object] = []
        for topic, payload in ((f"{base}/a", b"1"), ("", b"2"), (f"{base}/b", b"3"), ("", b"4")):
            out.append(publisher.publish(topic, payload, qos=1, properties=_alias(1)))
        # The fast path must not skip an aliased PUBLISH: this one resets alias 1 to "a".
        out.append(publisher.publish(f"{base}/a", b"5", qos=1))
        out.append(publisher.publish(f"{base}/a", b"6", qos=1, properties=_alias(1)))
        out.append(publisher.publish("", b"7", qos=1, properties=_alias(1)))
        out.append(subscriber.take(7))
        publisher.disconnect()
        subscriber.disconnect()
        return out

    direct, gateway = differential(sides, run)
    topics = ["a", "a", "b", "b", "a", "a", "a"]
    assert direct[-1] == [
        ("message", f"{base}/{t}", b"%d" % i, 1, False, {}) for i, t in enumerate(topics, 1)
    ]
    assert gateway == direct


def test_alias_errors_end_the_session(sides: tuple[Side, Side], device: Device) -> None:
    """An alias never set, and alias 11 above the broker's maximum of 10: DISCONNECT with
    0x82 and 0x94, nothing published."""
    topic = f"devices/{device.device_id}/bad"

    def run(side: Side) -> list[object]:
        subscriber = connected(Paho(side, device, f"{device.device_id}-sub"))
        subscriber.subscribe(topic, qos=1)
        out: list[object] = []
        for publish_topic, alias in (("", 3), (topic, 11)):
            client = connected(Paho(side, device))
            client.client.publish(publish_topic, b"x", qos=1, properties=_alias(alias))
            out.append(client.next())
            client.client.loop_stop()
        out.append(subscriber.quiet(0.3))
        subscriber.disconnect()
        return out

    direct, gateway = differential(sides, run)
    assert direct == [("disconnect", 0x82, {}), ("disconnect", 0x94, {}), []]
    assert gateway == direct


def test_broker_to_client_topic_alias_maximum(sides: tuple[Side, Side], device: Device) -> None:
    topic = f"devices/{device.device_id}/down"
    offer = w.props(bytes([0x22, 0, 5]))  # Topic Alias Maximum 5

    def run(side: Side) -> list[object]:
        client = wire(side, device)
        client.send(w.connect(device.device_id, properties=offer), w.subscribe(1, topic, 0))
        connack = client.recv()
        assert connack is not None
        out: list[object] = [connack[2][:2], client.recv()]
        publisher = connected(Paho(side, device, f"{device.device_id}-pub"))
        for i in range(3):
            publisher.publish(topic, b"%d" % i, qos=0)
        out.append(client.recv_all())
        publisher.disconnect()
        client.send(w.disconnect())
        client.close()
        return out

    direct, gateway = differential(sides, run)
    publish = w.utf8(topic) + b"\x00"  # the full topic, an empty property block
    assert direct[2] == [("PUBLISH", 0, publish + b"%d" % i) for i in range(3)]
    assert gateway == direct
