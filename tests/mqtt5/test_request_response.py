"""Request/response properties end to end (paho requester, mosquitto_sub / mosquitto_pub
responder): Response Topic, Correlation Data, User Properties (order and repeats kept),
Content Type, Payload Format Indicator, Message Expiry Interval; retained messages expiring.

Normalised: Message Expiry Interval. Mosquitto forwards the lifetime left, in whole
seconds, so a delivery may say 59 for 60 when a second boundary passes in between; the
value is checked to be within its bound and then replaced by the bound.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from paho.mqtt.packettypes import PacketTypes

from tests.gateway.conftest import Device
from tests.mqtt5.clients import Entry, Paho, connected, make_props, mosquitto_args
from tests.mqtt5.conftest import Side, differential

EXPIRY = "MessageExpiryInterval"


def _expiry(entry: Entry, bound: int, slack: int = 2) -> Entry:
    """``entry`` with its Message Expiry Interval checked against ``bound`` and set to it."""
    properties = dict(entry[-1])
    assert bound - slack <= properties[EXPIRY] <= bound, properties
    properties[EXPIRY] = bound
    return (*entry[:-1], properties)


def _responder(side: Side, device: Device, topic: str) -> subprocess.Popen[str]:
    """mosquitto_sub printing one request with its properties, once subscribed."""
    fmt = "MSG %t|%p|R=%R|D=%D|C=%C|F=%F|E=%E|P=%P"
    args = mosquitto_args(side, device, f"{device.device_id}-rsp")
    process = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", *args, "-d",
         "-t", topic, "-q", "1", "-C", "1", "-W", "10", "-F", fmt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:  # -d: debug lines (line-buffered by stdbuf) until its SUBACK
        if line.startswith("Subscribed (mid"):
            return process
    raise AssertionError(f"mosquitto_sub never subscribed: {process.stderr.read()}")  # type: ignore[union-attr]


def test_request_response_properties(sides: tuple[Side, Side], device: Device) -> None:
    base = f"devices/{device.device_id}"

    def run(side: Side) -> list[object]:
        requester = connected(Paho(side, device))
        requester.subscribe(f"{base}/resp", qos=1)
        responder = _responder(side, device, f"{base}/req")
        request = make_props(
            PacketTypes.PUBLISH,
            ResponseTopic=f"{base}/resp",
            CorrelationData=b"req-42",
            UserProperty=[("trace", "t1"), ("unit", "C"), ("trace", "t2")],
            ContentType="application/json",
            PayloadFormatIndicator=1,
            MessageExpiryInterval=60,
        )
        out: list[object] = [
            requester.publish(f"{base}/req", b'{"get":"temp"}', properties=request)
        ]
        seen, _ = responder.communicate(timeout=10)
        line = next(line for line in seen.splitlines() if line.startswith("MSG "))
        fields = line.split("|")
        assert fields[6].startswith("E=") and 58 <= int(fields[6][2:]) <= 60, fields
        fields[6] = "E=60"
        out.append(fields)
        response_topic = fields[2].removeprefix("R=")
        subprocess.run(
            ["mosquitto_pub", *mosquitto_args(side, device, f"{device.device_id}-rsp"),
             "-t", response_topic, "-q", "1", "-m", '{"temp":21.5}',
             "-D", "publish", "correlation-data", fields[3].removeprefix("D="),
             "-D", "publish", "user-property", "trace", "t1",
             "-D", "publish", "content-type", "application/json",
             "-D", "publish", "payload-format-indicator", "1",
             "-D", "publish", "message-expiry-interval", "30"],
            check=True, timeout=10,
        )  # fmt: skip
        out.append(_expiry(requester.next(), 30))
        # Payload Format Indicator 1 promises UTF-8. Mosquitto 2.0.11 does not check it (a
        # receiver may, with 0x99): the gateway, a pass-through here, must not differ.
        utf8 = make_props(PacketTypes.PUBLISH, PayloadFormatIndicator=1)
        out.append(requester.publish(f"{base}/req", b"\xff\xfe", properties=utf8))
        requester.disconnect()
        return out

    direct, gateway = differential(sides, run)
    assert direct[1] == [
        f"MSG {base}/req", '{"get":"temp"}', f"R={base}/resp", "D=req-42",
        "C=application/json", "F=1", "E=60", "P=trace:t1 unit:C trace:t2",
    ]  # fmt: skip
    response = {
        "PayloadFormatIndicator": 1,
        "MessageExpiryInterval": 30,
        "ContentType": "application/json",
        "CorrelationData": b"req-42".hex(),
        "UserProperty": [("trace", "t1")],
    }
    assert direct[2] == ("message", f"{base}/resp", b'{"temp":21.5}', 1, False, response)
    assert direct[3] == ("published", 0x10, {})  # accepted; no subscriber left
    assert gateway == direct


def test_retained_messages_expire(sides: tuple[Side, Side], device: Device) -> None:
    base = f"devices/{device.device_id}/exp"

    def run(side: Side) -> list[Any]:
        publisher = connected(Paho(side, device, f"{device.device_id}-pub"))
        for name, expiry in (("short", 1), ("long", 60)):
            lifetime = make_props(PacketTypes.PUBLISH, MessageExpiryInterval=expiry)
            publisher.publish(f"{base}/{name}", name.encode(), retain=True, properties=lifetime)
        publisher.disconnect()
        time.sleep(2.2)  # "short" expires (Mosquitto counts whole seconds)
        subscriber = connected(Paho(side, device))
        subscriber.subscribe(f"{base}/#", qos=1)
        got = [_expiry(entry, 60, slack=4) for entry in subscriber.quiet(0.3)]
        subscriber.disconnect()
        return got

    direct, gateway = differential(sides, run)
    assert direct == [("message", f"{base}/long", b"long", 1, True, {EXPIRY: 60})]
    assert gateway == direct
