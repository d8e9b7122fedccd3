"""The broker side: URLs, and an ``mqtts://`` upstream (Mosquitto with a TLS listener)."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from pathlib import Path

from gateway.mqtt import Disconnect, Publish, Suback, Subscribe, Subscription, encode
from gateway.upstream import UpstreamTarget
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.witness import Observer, will_of
from tests.helpers import free_port, mosquitto


def test_upstream_urls() -> None:
    plain = UpstreamTarget.from_url("mqtt://127.0.0.1:1883")
    assert (plain.host, plain.port, plain.ssl_context) == ("127.0.0.1", 1883, None)
    secure = UpstreamTarget.from_url("mqtts://broker.example:8883/")
    assert (secure.host, secure.port) == ("broker.example", 8883)
    assert secure.ssl_context is not None
    assert secure.ssl_context.verify_mode is ssl.CERT_REQUIRED
    assert UpstreamTarget.from_url("mqtt://[::1]:1883").host == "::1"


def test_mqtts_upstream(
    harness: Harness, make_device: DeviceFactory, pki: Pki, tmp_path: Path
) -> None:
    # Mosquitto started as root drops to its own user: give it readable copies of the
    # server files, outside pytest's private (0700) temporary tree.
    with tempfile.TemporaryDirectory(prefix="dg-mqtts-") as name:
        readable = Path(name)
        readable.chmod(0o755)
        for file in ("chain.pem", "server.crt", "server.key"):
            shutil.copy(pki.directory / file, readable / file)
            (readable / file).chmod(0o644)
        tls_port = free_port()
        extra = (
            f"listener {tls_port} 127.0.0.1\ncafile {readable / 'chain.pem'}\n"
            f"certfile {readable / 'server.crt'}\nkeyfile {readable / 'server.key'}\n"
        )
        with mosquitto(tmp_path, extra_config=extra) as plain_port:
            context = ssl.create_default_context(cafile=str(pki.chain))
            gateway = harness.start_gateway(upstream=UpstreamTarget("127.0.0.1", tls_port, context))
            try:
                _round_trip(gateway.port, make_device("tlsup"))
                _last_write(gateway.port, plain_port, make_device("tlsup"))
            finally:
                harness.call(gateway.close())


def _round_trip(port: int, device: Device) -> None:
    topic = f"devices/{device.device_id}/t"
    with RawClient(port, device, device.chain, version=5) as client:
        assert client.connect(device.device_id).reason_code == 0
        client.send(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic),)))
        assert isinstance(client.recv(), Suback)
        client.send(Publish(topic=topic, payload=b"over tls"))
        message = client.recv()
        assert isinstance(message, Publish) and message.payload == b"over tls"


def _last_write(port: int, plain_port: int, device: Device) -> None:
    """Issue 18 over TLS: a burst and DISCONNECT in one write, while the broker echoes the
    burst, all reach it (the TLS close reads to the broker's close too): no will."""
    mine = f"devices/{device.device_id}/echo"
    burst = b"".join(encode(Publish(topic=mine, payload=b"%d" % i), version=4) for i in range(20))
    with Observer(plain_port, device.device_id) as observer:
        for _ in range(5):
            with RawClient(port, device, device.chain) as client:
                assert (
                    client.connect(device.device_id, will=will_of(device.device_id)).reason_code
                    == 0
                )
                client.send(
                    Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=mine),))
                )
                assert isinstance(client.recv(), Suback)
                client.send_bytes(burst + encode(Disconnect(), version=4))
                assert client.closed()
        assert observer.wait(lambda: len(observer.messages(mine)) == 100)
        observer.settle()
        assert observer.wills() == 0
