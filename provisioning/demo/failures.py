"""Failures of a simulated device named in words, for ``devicegate simulate``'s error table.

One table of MQTT return and reason codes (3.1.1 CONNACK return codes, MQTT 5 reason codes
of 0x80 and up) so that an operator reads "MQTT CONNACK 0x86 bad user name or password"
rather than ``rc_134``; TLS failures by what went wrong ("TLS: certificate expired").
"""

from __future__ import annotations

import ssl
from typing import Final

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["MQTT_CODES", "mqtt_failure", "tls_failure"]

MQTT_311: Final = 4
MQTT_5: Final = 5

MQTT_CODES: Final[dict[tuple[int, int], str]] = {
    # MQTT 3.1.1, CONNACK return codes (section 3.2.2.3)
    (MQTT_311, 0x01): "unacceptable protocol version",
    (MQTT_311, 0x02): "identifier rejected",
    (MQTT_311, 0x03): "server unavailable",
    (MQTT_311, 0x04): "bad user name or password",
    (MQTT_311, 0x05): "not authorized",
    # MQTT 5, reason codes that are failures (section 2.4)
    (MQTT_5, 0x80): "unspecified error",
    (MQTT_5, 0x81): "malformed packet",
    (MQTT_5, 0x82): "protocol error",
    (MQTT_5, 0x83): "implementation specific error",
    (MQTT_5, 0x84): "unsupported protocol version",
    (MQTT_5, 0x85): "client identifier not valid",
    (MQTT_5, 0x86): "bad user name or password",
    (MQTT_5, 0x87): "not authorized",
    (MQTT_5, 0x88): "server unavailable",
    (MQTT_5, 0x89): "server busy",
    (MQTT_5, 0x8A): "banned",
    (MQTT_5, 0x8B): "server shutting down",
    (MQTT_5, 0x8C): "bad authentication method",
    (MQTT_5, 0x8D): "keep alive timeout",
    (MQTT_5, 0x8E): "session taken over",
    (MQTT_5, 0x8F): "topic filter invalid",
    (MQTT_5, 0x90): "topic name invalid",
    (MQTT_5, 0x91): "packet identifier in use",
    (MQTT_5, 0x92): "packet identifier not found",
    (MQTT_5, 0x93): "receive maximum exceeded",
    (MQTT_5, 0x94): "topic alias invalid",
    (MQTT_5, 0x95): "packet too large",
    (MQTT_5, 0x96): "message rate too high",
    (MQTT_5, 0x97): "quota exceeded",
    (MQTT_5, 0x98): "administrative action",
    (MQTT_5, 0x99): "payload format invalid",
    (MQTT_5, 0x9A): "retain not supported",
    (MQTT_5, 0x9B): "QoS not supported",
    (MQTT_5, 0x9C): "use another server",
    (MQTT_5, 0x9D): "server moved",
    (MQTT_5, 0x9E): "shared subscriptions not supported",
    (MQTT_5, 0x9F): "connection rate exceeded",
    (MQTT_5, 0xA0): "maximum connect time",
    (MQTT_5, 0xA1): "subscription identifiers not supported",
    (MQTT_5, 0xA2): "wildcard subscriptions not supported",
}


def mqtt_failure(exc: aiomqtt.MqttError) -> str:
    """``MQTT <PACKET> 0x<code> <words>`` for a code error, ``MQTT: <message>`` otherwise.

    paho hands MQTT 5 codes over as a `ReasonCode`, which names its packet; a plain integer
    is a 3.1.1 CONNACK return code on a refused connect, else paho's own error number
    (``rc_4`` was "the client is not currently connected")."""
    rc = exc.rc if isinstance(exc, aiomqtt.MqttCodeError) else None
    if isinstance(rc, ReasonCode):
        packet = PacketTypes.Names[rc.packetType].upper()
        words = MQTT_CODES.get((MQTT_5, rc.value), str(rc).lower())
        return f"MQTT {packet} 0x{rc.value:02X} {words}"
    if isinstance(rc, int) and isinstance(exc, MqttConnectError):
        return f"MQTT CONNACK 0x{rc:02X} {MQTT_CODES.get((MQTT_311, rc), 'unknown code')}"
    if isinstance(rc, int):  # paho's own error (MQTT_ERR_*), not a code on the wire
        return "MQTT client: " + error_string(rc).rstrip(".").lower()
    return "MQTT: " + (" ".join(str(exc).split()[:6]) or "error")


_ALERT_PREFIXES: Final = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")


def tls_failure(exc: ssl.SSLError) -> str:
    """``TLS: <what>``: the gateway's alert (it refused this device's certificate), or why
    this device refused the gateway's certificate."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"TLS: gateway certificate rejected: {exc.verify_message}"
    reason = exc.reason or "error"
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            reason = reason.removeprefix(prefix)
            break
    return "TLS: " + reason.lower().replace("_", " ")
