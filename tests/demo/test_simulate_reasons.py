"""``devicegate simulate``'s failure labels and rate warnings, from data (no stack)."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from provisioning.demo.failures import MQTT_CODES, mqtt_failure, tls_failure
from provisioning.demo.simulate import SimulationConfig, Stats, error_reason, shortfalls
from tests.conftest import Pki


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (MqttConnectError(4), "MQTT CONNACK 0x04 bad user name or password"),
        (
            MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x86)),
            "MQTT CONNACK 0x86 bad user name or password",
        ),
        (
            aiomqtt.MqttCodeError(
                ReasonCode(PacketTypes.DISCONNECT, identifier=0x98), "Unexpected disconnection"
            ),
            "MQTT DISCONNECT 0x98 administrative action",
        ),
        (
            aiomqtt.MqttCodeError(4, "Could not publish message"),
            "MQTT client: the client is not currently connected",
        ),
        (aiomqtt.MqttError("Operation timed out"), "MQTT: Operation timed out"),
    ],
)
def test_mqtt_failures_are_named_in_words(exc: aiomqtt.MqttError, label: str) -> None:
    assert mqtt_failure(exc) == label == error_reason(exc)


def test_the_table_covers_every_connack_311_code_and_the_mqtt5_failures() -> None:
    assert {code for version, code in MQTT_CODES if version == 4} == set(range(1, 6))
    assert {code for version, code in MQTT_CODES if version == 5} == set(range(0x80, 0xA3))


def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] ...")
    exc.reason = reason
    return exc


def test_tls_failures_are_named_in_words() -> None:
    assert tls_failure(_ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED")) == "TLS: certificate expired"
    assert tls_failure(_ssl_error("TLSV1_ALERT_UNKNOWN_CA")) == "TLS: unknown ca"
    assert tls_failure(_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED")) == (
        "TLS: certificate required"
    )


def handshake_error(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLError:
    """The error a real TLS handshake (in memory, no sockets) raises on the client's side."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    left = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    right = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # a handshake takes a few flights
        for side, outbox, peer_inbox in (
            (left, c_out, s_in),
            (right, s_out, c_in),
        ):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if side is left:
                    return exc
            peer_inbox.write(outbox.read())
    raise AssertionError("the handshake did not fail")


def test_a_real_tls_verification_failure_is_named(pki: Pki) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    exc = handshake_error(ssl.create_default_context(), server)  # the project's CA unknown
    assert isinstance(exc, ssl.SSLCertVerificationError)
    assert error_reason(exc) == f"TLS: gateway certificate rejected: {exc.verify_message}"
    assert "certificate" in exc.verify_message


def _config(**changes: object) -> SimulationConfig:
    fields: dict[str, object] = dict(
        provisioning_url="https://127.0.0.1:1", gateway_host="127.0.0.1", gateway_port=1,
        ca_cert=Path("ca.pem"), token=None, devices=10, rate=10.0, messages_per_second=10.0,
        duration=10.0,
    )  # fmt: skip
    return SimulationConfig(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_rate_far_below_the_one_asked_for_is_warned_about() -> None:
    # 10 devices for 10 s each at 10/s asked: 1,000 messages; 200 sent is 20 %.
    stats = Stats(messages=200, publishing_s=100.0, started=[0.0 + i * 0.1 for i in range(10)])
    (warning,) = shortfalls(stats, _config())
    assert warning.startswith("messages per second per device: 2.0 achieved of 10 asked for (20%)")
    assert "CPU" in warning and "gateway's limits" in warning
    # Starts: 10 devices over 9 s where 0.9 s was asked.
    slow = Stats(messages=1000, publishing_s=100.0, started=[float(i) for i in range(10)])
    (warning,) = shortfalls(slow, _config())
    assert warning.startswith("devices online per second: 1.0 achieved of 10 asked for (10%)")
    # Within the bound: no warning.
    fine = Stats(messages=800, publishing_s=100.0, started=[i * 0.15 for i in range(10)])
    assert shortfalls(fine, _config()) == []
