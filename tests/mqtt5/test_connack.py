"""What the broker announces in CONNACK, and holds clients to: Server Keep Alive, Maximum
QoS, Retain Available, Maximum Packet Size (the broker's, lower than the gateway's), an
assigned client id, and a refused authentication method."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes

from tests.gateway.conftest import Device
from tests.mqtt5.clients import ASSIGNED, Paho, connected, make_props
from tests.mqtt5.conftest import Side, differential

BROKER_CONFIG = "max_keepalive 10\nmax_qos 1\nretain_available false\nmax_packet_size 2000\n"


def test_broker_limits(sides: tuple[Side, Side], device: Device) -> None:
    topic = f"devices/{device.device_id}/limits"

    def run(side: Side) -> list[object]:
        subscriber = Paho(side, device, f"{device.device_id}-sub")
        out: list[object] = [subscriber.next(), subscriber.subscribe(topic, qos=2)]
        for qos, retain, size in (
            (1, False, 1500),
            (2, False, 10),
            (1, True, 10),
            (1, False, 3000),
        ):
            client = connected(Paho(side, device))
            client.client.publish(topic, b"x" * size, qos=qos, retain=retain)
            out.append(client.next())
            client.client.loop_stop()
        out.append([(m[0], m[1], len(m[2]), *m[3:]) for m in subscriber.quiet(0.3)])
        subscriber.disconnect()
        return out

    direct, gateway = differential(sides, run)
    limits = {
        "ServerKeepAlive": 10, "MaximumQoS": 1, "RetainAvailable": 0,
        "MaximumPacketSize": 2000, "TopicAliasMaximum": 10, "ReceiveMaximum": 20,
    }  # fmt: skip
    assert direct == [
        ("connack", 0, False, limits),
        ("suback", [1], {}),  # QoS 2 asked, 1 granted
        ("published", 0, {}),
        ("disconnect", 0x9B, {}),  # QoS not supported
        ("disconnect", 0x9A, {}),  # Retain not supported
        ("disconnect", 0x95, {}),  # Packet too large (the broker's 2000 bytes)
        [("message", topic, 1500, 1, False, {})],
    ]
    assert gateway == direct


def test_assigned_client_id_and_auth_method(sides: tuple[Side, Side], device: Device) -> None:
    """An empty client id gets one assigned (the broker's own, or the device id through
    the gateway: normalised); an Authentication Method the broker does not know is refused
    with 0x8C (the gateway refuses every one: enhanced authentication would bypass the
    certificate)."""

    def run(side: Side) -> list[object]:
        anonymous = Paho(side, device, "")
        out: list[object] = [anonymous.next()]
        anonymous.disconnect()
        scram = make_props(PacketTypes.CONNECT, AuthenticationMethod="SCRAM-SHA-1")
        refused = Paho(side, device, properties=scram)
        out.append(refused.next())
        refused.client.loop_stop()
        return out

    direct, gateway = differential(sides, run)
    assert direct[0][-1]["AssignedClientIdentifier"] == ASSIGNED  # type: ignore[index]
    assert direct[1] == ("connack", 0x8C, False, {})  # Bad authentication method
    assert gateway == direct
