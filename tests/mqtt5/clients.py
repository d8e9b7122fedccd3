"""The independent clients of the suite, each reduced to a transcript of what it saw.

A transcript entry is a plain tuple (kind, fields...) with properties as a dict, so two
runs compare with ``==``. Normalised, in `connack` only, what the gateway changes on
purpose (gateway/connection.py):

* Maximum Packet Size: the gateway lowers it to its own limit, or adds it when the broker
  sent none, so a compliant client never sends what the gateway would refuse. Dropped
  when it is the gateway's limit; a lower limit of the broker's is kept and compared.
* Assigned Client Identifier: a broker makes one up for an empty client id; the gateway
  assigns the device id (the identity its certificate proves). Checked, then replaced by
  a placeholder.
* A refusing CONNACK's properties: the gateway refuses some CONNECTs itself, without
  asking the broker (an Authentication Method: identity comes from the certificate), so
  it cannot repeat the broker's capabilities there. A refusal is its reason code.
"""

from __future__ import annotations

import queue
import socket
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.gateway.conftest import Device
from tests.mqtt5.conftest import Side
from tests.mqtt5.wire import Wire

Entry = tuple[Any, ...]


def as_dict(properties: Properties | None) -> dict[str, Any]:
    return {} if properties is None else properties.json()


def make_props(packet_type: int, **values: Any) -> Properties:
    """Properties by paho name: ``make_props(PacketTypes.PUBLISH, ResponseTopic="a/b")``."""
    made = Properties(packet_type)
    for name, value in values.items():
        setattr(made, name, value)
    return made


ASSIGNED = "<assigned>"


def connack(
    side: Side, device: Device, flags: Any, reason: ReasonCode, properties: Properties | None
) -> Entry:
    """The CONNACK as seen, normalised (see the module docstring)."""
    if reason.value >= 0x80:
        return ("connack", reason.value, bool(flags.session_present), {})
    seen = as_dict(properties)
    if side.harness is not None:
        own = side.harness.gateway.config.max_packet_size
        limit = seen.pop("MaximumPacketSize")  # always there through the gateway
        assert limit <= own, seen
        if limit < own:  # the broker's own, lower: kept, compared
            seen["MaximumPacketSize"] = limit
    assigned = seen.get("AssignedClientIdentifier")
    if assigned is not None:
        assert assigned == device.device_id if side.via_gateway else assigned.startswith("auto-")
        seen["AssignedClientIdentifier"] = ASSIGNED
    return ("connack", reason.value, bool(flags.session_present), seen)


def message(msg: paho.MQTTMessage) -> Entry:
    return ("message", msg.topic, msg.payload, msg.qos, bool(msg.retain), as_dict(msg.properties))


class Paho:
    """A paho-mqtt v5 client on its own network thread, recording every callback."""

    def __init__(
        self,
        side: Side,
        device: Device,
        client_id: str | None = None,
        *,
        clean_start: bool = True,
        properties: Properties | None = None,
        will: tuple[str, bytes, Properties | None] | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.side = side
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=device.device_id if client_id is None else client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        context = side.context(device)
        if context is not None:
            self.client.tls_set_context(context)
        if will is not None:
            topic, payload, will_properties = will
            self.client.will_set(topic, payload, qos=1, properties=will_properties)
        self.inbox: queue.Queue[Entry] = queue.Queue()
        self.messages: list[paho.MQTTMessage] = []
        c = self.client
        c.on_connect = lambda _c, _u, flags, rc, p: self.inbox.put(
            connack(side, device, flags, rc, p)
        )
        c.on_subscribe = lambda _c, _u, _m, codes, p: self.inbox.put(
            ("suback", [code.value for code in codes], as_dict(p))
        )
        c.on_publish = lambda _c, _u, _m, rc, p: self.inbox.put(("published", rc.value, as_dict(p)))
        c.on_message = self._on_message
        c.on_disconnect = lambda _c, _u, _f, rc, p: self.inbox.put(
            ("disconnect", rc.value, as_dict(p))
        )
        c.connect(
            "127.0.0.1", side.port, keepalive=30, clean_start=clean_start, properties=properties
        )
        c.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.messages.append(msg)
        self.inbox.put(message(msg))

    def next(self, timeout: float = 5.0) -> Entry:
        """The next entry; raises queue.Empty after ``timeout``."""
        return self.inbox.get(timeout=timeout)

    def take(self, count: int, timeout: float = 5.0) -> list[Entry]:
        deadline = time.monotonic() + timeout
        return [self.next(max(0.01, deadline - time.monotonic())) for _ in range(count)]

    def quiet(self, seconds: float = 0.3) -> list[Entry]:
        """Whatever arrives within ``seconds`` (usually: proof that nothing does)."""
        deadline = time.monotonic() + seconds
        out: list[Entry] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return out

    def subscribe(self, topic_filter: str, qos: int = 1, **properties: Any) -> Entry:
        made = make_props(PacketTypes.SUBSCRIBE, **properties) if properties else None
        self.client.subscribe(topic_filter, qos=qos, properties=made)
        return self.next()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> Entry | None:
        """Publish; for QoS 1 and 2 wait for the outcome (PUBACK / PUBCOMP) and return it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0:
            info.wait_for_publish(5)
            return None
        return self.next()

    def disconnect(self, reason: str | None = None, **properties: Any) -> None:
        """A DISCONNECT (optionally with a reason name and properties); stop the thread.

        Entries still queued before the client's own "disconnect" are dropped.
        """
        code = ReasonCode(PacketTypes.DISCONNECT, reason) if reason else None
        made = make_props(PacketTypes.DISCONNECT, **properties) if properties else None
        self.client.disconnect(reasoncode=code, properties=made)
        # paho reports the DISCONNECT once written: only then may its thread stop.
        while self.next()[0] != "disconnect":
            pass
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT: a FIN, no TLS close_notify, no MQTT goodbye."""
        sock = self.client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # wakes paho's thread, which then ends
        while self.next()[0] != "disconnect":
            pass
        self.client.loop_stop()


def connected(client: Paho) -> Paho:
    """``client`` once its CONNACK came (asserting it accepted)."""
    entry = client.next()
    assert entry[:2] == ("connack", 0), entry
    return client


def aiomqtt_client(side: Side, device: Device, client_id: str | None = None, **kw: Any) -> Any:
    """An aiomqtt v5 client (an async context manager) for ``side``."""
    return aiomqtt.Client(
        "127.0.0.1",
        side.port,
        identifier=client_id or device.device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=side.context(device),
        timeout=5,
        **kw,
    )


def mosquitto_args(side: Side, device: Device, client_id: str) -> list[str]:
    """Common mosquitto_pub / mosquitto_sub arguments for ``side``, MQTT 5."""
    args = ["-h", "127.0.0.1", "-p", str(side.port), "-V", "mqttv5", "-i", client_id]
    if side.via_gateway:
        args += ["--cafile", str(device.chain), "--cert", str(device.cert)]
        args += ["--key", str(device.key)]
    return args


def wire(side: Side, device: Device) -> Wire:
    return Wire(side.socket(device))
