"""``devicegate serve gateway --workers 2``: both workers serve, a dead one is restarted,
SIGTERM drains without cutting a packet in flight, exits 0, and the spool is shipped."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.mqtt import NEED_DATA, decode, encode
from gateway.mqtt.packets import (
    Connack,
    Connect,
    Disconnect,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from provisioning.commands.cli import app
from tests.conftest import Pki
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.helpers import free_port, wait_for_port

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    instance: str
    log: Path

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


@pytest.fixture
def served(pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path) -> Iterator[Served]:
    port = free_port()
    instance = f"workers-{os.getpid()}-{port}"
    policy = tmp_path / "policy.toml"
    policy.write_text('[fleets.bench]\nclient_ids = ["{device_id}", "{device_id}-*"]\n')
    env = {
        "DEVICEGATE_POLICY_FILE": str(policy),
        **os.environ,
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "DEVICEGATE_INSTANCE_ID": instance,
        "DEVICEGATE_METRICS_LISTEN": "127.0.0.1:0",  # any free port: tests run side by side
        "DEVICEGATE_DRAIN_TIMEOUT": "5s",
        "DEVICEGATE_LOG_FORMAT": "text",
    }
    log = tmp_path / "gateway.log"
    command = [
        DEVICEGATE, "serve", "gateway", "--workers", "2",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"mqtt://127.0.0.1:{mosquitto_port}",
    ]  # fmt: skip
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, env=env, stderr=stderr)
    served = Served(process, port, instance, log)
    try:
        try:
            wait_for_port(port, timeout=20)
            deadline = time.monotonic() + 20
            while len(served.workers()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        except TimeoutError:
            raise AssertionError(log.read_text()) from None
        yield served
    finally:
        if process.poll() is None:
            for pid in served.workers():
                os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait()


def _connect_once(port: int, device: Device, client_id: str) -> None:
    with RawClient(port, device, device.chain) as client:
        connack = client.connect(client_id)
        assert connack.reason_code == 0
        client.send(Disconnect())


def _chains(harness: Harness, instance: str) -> set[str]:
    rows = harness.query("SELECT DISTINCT chain_id FROM auth_events WHERE instance = $1", instance)
    # A chain id is <instance>/w<N>#<random made with the spool>: the names, here.
    return {row["chain_id"].partition("#")[0] for row in rows}


# --- an asyncio MQTT 5 publisher (QoS 1, pipelined) and a plain subscriber ----------------


@dataclass
class PublishRun:
    sent: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    disconnect: int | None = None
    closed: bool = False


async def _packets(reader: asyncio.StreamReader, version: int) -> asyncio.Queue[object]:
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        buf = b""
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                await queue.put(None)
                return
            buf += data
            while True:
                result = decode(buf, version=version)
                if result is NEED_DATA:
                    break
                packet, used = result
                buf = buf[used:]
                await queue.put(packet)

    asyncio.get_running_loop().create_task(pump())
    return queue


async def _publish_until_closed(
    port: int, device: Device, topic: str, run: PublishRun, started: asyncio.Event
) -> None:
    context = client_context(device, device.chain)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    writer.write(encode(Connect(protocol_level=5, client_id=device.device_id), version=5))
    packets = await _packets(reader, 5)
    connack = await asyncio.wait_for(packets.get(), 5)
    assert isinstance(connack, Connack) and connack.reason_code == 0
    window = asyncio.Semaphore(10)

    async def send() -> None:
        for packet_id in range(1, 60000):
            await window.acquire()
            if run.closed:
                return
            publish = Publish(topic=topic, payload=b"%d" % packet_id, qos=1, packet_id=packet_id)
            writer.write(encode(publish, version=5))
            run.sent.append(packet_id)
            if packet_id == 50:
                started.set()
            await asyncio.sleep(0.001)

    sender = asyncio.get_running_loop().create_task(send())
    try:
        while True:
            packet = await asyncio.wait_for(packets.get(), 20)
            if packet is None:
                run.closed = True
                break
            if isinstance(packet, Puback):
                assert packet.reason_code == 0
                run.acked.append(packet.packet_id)
                window.release()
            elif isinstance(packet, Disconnect):
                run.disconnect = packet.reason_code
    finally:
        run.closed = True
        window.release()
        sender.cancel()
        writer.close()


async def _subscribe(port: int, topic: str, got: list[int], ready: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(Connect(protocol_level=4, client_id=f"sub-{os.getpid()}"), version=4))
    packets = await _packets(reader, 4)
    assert isinstance(await packets.get(), Connack)
    writer.write(
        encode(
            Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic, qos=1),)),
            version=4,
        )
    )
    assert isinstance(await packets.get(), Suback)
    ready.set()
    try:
        while True:
            packet = await packets.get()
            if isinstance(packet, Publish):
                got.append(int(bytes(packet.payload)))
                if packet.qos and packet.packet_id is not None:
                    writer.write(encode(Puback(packet_id=packet.packet_id), version=4))
    finally:
        writer.close()


def test_two_workers_restart_and_drain(
    served: Served,
    harness: Harness,
    make_device: DeviceFactory,
    mosquitto_port: int,
) -> None:
    device = make_device("workers", fleet="bench")
    # Both workers accept connections (SO_REUSEPORT spreads them by 4-tuple hash).
    wanted = {f"{served.instance}/w0", f"{served.instance}/w1"}
    for i in range(40):
        _connect_once(served.port, device, f"{device.device_id}-{i}")
        if i >= 7 and _chains(harness, served.instance) >= wanted:
            break
    deadline = time.monotonic() + 5
    while not _chains(harness, served.instance) >= wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _chains(harness, served.instance) >= wanted

    # A worker that dies is replaced, and the port keeps serving.
    before = served.workers()
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = served.workers()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.05)
    assert len(served.workers()) == 2 and before[0] not in served.workers()
    for i in range(6):  # whichever worker the hash picks, it answers
        deadline = time.monotonic() + 5
        while True:
            try:
                _connect_once(served.port, device, f"{device.device_id}-r{i}")
                break
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # SIGTERM while a device publishes QoS 1: every message the broker got was acked to
    # the device before its DISCONNECT 0x8B; nothing is cut mid-packet.
    topic = f"devices/{device.device_id}/drain"
    run = PublishRun()
    got: list[int] = []

    async def scenario() -> None:
        ready, started = asyncio.Event(), asyncio.Event()
        subscriber = asyncio.create_task(_subscribe(mosquitto_port, topic, got, ready))
        await asyncio.wait_for(ready.wait(), 5)
        publisher = asyncio.create_task(
            _publish_until_closed(served.port, device, topic, run, started)
        )
        await asyncio.wait_for(started.wait(), 10)
        served.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(publisher, 20)
        deadline = asyncio.get_running_loop().time() + 5
        while not set(run.acked) <= set(got):  # the subscriber's last deliveries
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # and anything the broker got without a PUBACK to us
        subscriber.cancel()

    asyncio.run(scenario())
    assert served.process.wait(30) == 0, served.log.read_text()
    assert run.disconnect == 0x8B, run
    assert run.acked == list(range(1, len(run.acked) + 1))
    assert len(run.acked) >= 50
    assert set(got) <= set(run.acked), sorted(set(got) - set(run.acked))
    assert set(run.acked) <= set(got)
    # The spool was shipped before exit: the end of that session is already stored.
    rows = harness.query(
        "SELECT type, reason, outcome FROM auth_events WHERE instance = $1 AND client_id = $2"
        " ORDER BY time",
        served.instance,
        device.device_id,
    )
    assert [(r["type"], r["reason"]) for r in rows] == [
        ("connect", "ok"),
        ("session_end", "server_shutting_down"),
    ]


def test_a_bad_configuration_fails_once_with_a_clear_message(tmp_path: Path) -> None:
    # Checked by the supervisor before any worker starts: no restart loop.
    result = CliRunner().invoke(
        app,
        ["serve", "gateway", "--workers", "2", "--listen", "127.0.0.1:0"],
        env={"DEVICEGATE_PKI_DIR": str(tmp_path / "missing")},
    )
    assert result.exit_code == 1
    assert "devicegate ca init" in result.output
