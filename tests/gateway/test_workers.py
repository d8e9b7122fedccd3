"""``devicegate serve gateway --workers 2``: both workers serve, a dead one is restarted,
SIGTERM drains without cutting a packet in flight, exits 0, and the spool is shipped; the
failed-handshake budget of an address is the instance's, not each worker's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    Will,
)
from provisioning.commands.cli import app
from tests.conftest import Pki
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.served import Served, serve_gateway


@pytest.fixture
def served(pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path) -> Iterator[Served]:
    with serve_gateway(
        pki=pki,
        database_url=database_url,
        upstream_port=mosquitto_port,
        directory=tmp_path,
        name="workers",
    ) as served:
        yield served


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
    # A will on the watched topic: a drain must not fire it (payload -1, never acked).
    will = Will(topic=topic, payload=b"-1", qos=1)
    connect = Connect(protocol_level=5, client_id=device.device_id, will=will)
    writer.write(encode(connect, version=5))
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
    # the device before its DISCONNECT 0x8B; nothing is cut mid-packet; the broker got a
    # DISCONNECT too, so the device's will did not fire.
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


FAILED_HANDSHAKES_PER_MINUTE = 30  # the documented default (Settings)
NOT_FAILURES = ("rate_limited", "too_many_connections", "proxy_protocol_error")


def _handshake_without_certificate(port: int, chain: Path) -> None:
    """A TLS client with no certificate: refused (no_client_certificate)."""
    context = ssl.create_default_context(cafile=str(chain))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        contextlib.suppress(ssl.SSLError, ConnectionError),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(1) == b""


def _wait_listening(served: Served, times: int) -> None:
    """Until the log says ``times`` times that a worker listens (starts and restarts)."""
    deadline = time.monotonic() + 20
    while served.log.read_text().count("gateway listening on") < times:
        assert time.monotonic() < deadline, served.log.read_text()
        time.sleep(0.05)


def test_failed_handshakes_share_one_budget_per_instance(
    served: Served, harness: Harness, pki: Pki
) -> None:
    # A restarted worker is on the mesh again (the supervisor kept its sockets).
    _wait_listening(served, 2)
    (victim, _) = served.workers()
    os.kill(victim, signal.SIGKILL)
    _wait_listening(served, 3)
    assert victim not in served.workers()
    # 80 failed handshakes from 127.0.0.1, one after another, spread by the kernel over both
    # workers: with a budget per worker about 60 would be recorded one by one, per instance
    # 30 (plus what the bucket refills meanwhile, 0.5 a second, and a few in flight between
    # workers); the rest are counted in summaries.
    attempts = 80
    started = time.monotonic()
    for _ in range(attempts):
        _handshake_without_certificate(served.port, pki.chain)
    elapsed = time.monotonic() - started
    served.process.send_signal(signal.SIGTERM)  # drains: the refusal counts are recorded
    assert served.process.wait(30) == 0, served.log.read_text()
    rows = harness.query(
        "SELECT chain_id, reason, detail FROM auth_events"
        " WHERE instance = $1 AND type = 'tls_handshake' AND outcome = 'denied'",
        served.instance,
    )
    failures = [r for r in rows if r["reason"] not in NOT_FAILURES]
    # Within the budget one event each; beyond it, summaries counting the rest exactly.
    failed = [r for r in failures if "count" not in json.loads(r["detail"])]
    summaries = [r for r in failures if "count" in json.loads(r["detail"])]
    summarised = sum(json.loads(r["detail"])["count"] for r in summaries)
    wanted = {f"{served.instance}/w0", f"{served.instance}/w1"}

    def writers(rows: list[Any]) -> set[str]:  # the chain id without its random part
        return {row["chain_id"].partition("#")[0] for row in rows}

    assert writers(failed) == wanted  # both workers let some through one by one
    assert writers(summaries) == wanted  # and both summarised some
    assert {json.loads(r["detail"])["address"] for r in summaries} == {"127.0.0.1"}
    assert not [r for r in rows if r["reason"] == "rate_limited"]  # none refused at accept
    assert len(failed) + summarised == attempts  # every attempt is accounted for, exactly
    budget = FAILED_HANDSHAKES_PER_MINUTE
    refill = elapsed * budget / 60
    assert budget <= len(failed) <= budget + refill + 3, (len(failed), summarised, elapsed)
