"""Gateway faults (issue 11, item 6): the upstream broker dies and comes back; SIGTERM under
publishing load. PostgreSQL restarts, worker kill -9 and a full spool are in tests/faults.

A clock jump is not tested: faking wall-clock time for a live gateway (its TLS validity
checks, event times, token buckets on the monotonic clock) needs a privileged time
namespace or libfaketime across threads, neither of which is safe or available here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from gateway.events.codec import decode_payload
from gateway.events.spool import read_segment
from gateway.mqtt import (
    Connack,
    Disconnect,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from gateway.upstream import UpstreamTarget
from provisioning.audit.verify import verify_chains
from tests.conftest import Pki
from tests.faults.conftest import gateway_process, register_devices
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.live import wait_for
from tests.helpers import free_port, wait_for_port

# --- the upstream broker restarts --------------------------------------------------------


class Broker:
    """A Mosquitto that can be killed and started again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.config = directory / f"mosquitto-{self.port}.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None


@contextlib.contextmanager
def broker(directory: Path) -> Iterator[Broker]:
    b = Broker(directory)
    b.start()
    try:
        yield b
    finally:
        b.kill()


def _publish(client: RawClient, device: Device, packet_id: int) -> None:
    topic = f"devices/{device.device_id}/telemetry"
    client.send(Publish(topic=topic, payload=b"tick", qos=1, packet_id=packet_id))
    reply = client.recv()
    assert isinstance(reply, Puback) and reply.packet_id == packet_id, reply


def _session(port: int, device: Device, version: int) -> RawClient:
    client = RawClient(port, device, device.chain, version=version)
    assert client.connect(device.device_id).reason_code == 0
    # Its own topic comes back through the broker: the bridge really is end to end.
    topic = f"devices/{device.device_id}/echo"
    client.send(Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter=topic, qos=1),)))
    assert isinstance(client.recv(), Suback)
    return client


def test_upstream_broker_restart(
    harness: Harness, make_device: DeviceFactory, tmp_path: Path
) -> None:
    devices = [make_device(f"up{i}") for i in range(4)]
    versions = [4, 5, 4, 5]
    with broker(tmp_path) as mqtt:
        gateway = harness.start_gateway(upstream=UpstreamTarget("127.0.0.1", mqtt.port))
        try:
            mark = harness.mark()
            clients = [_session(gateway.port, d, v) for d, v in zip(devices, versions, strict=True)]
            for client, device in zip(clients, devices, strict=True):
                _publish(client, device, 2)
            killed = time.monotonic()
            mqtt.kill()
            # Every session is closed cleanly (v5: DISCONNECT first), promptly.
            for client, version in zip(clients, versions, strict=True):
                if version == 5:
                    assert isinstance(client.recv(timeout=5), Disconnect | None)
                assert client.closed(timeout=5)
                client.close()
            assert time.monotonic() - killed < 5
            wait_for(lambda: not gateway.connections, timeout=5)
            ends = harness.wait_events(len(devices), after=mark, type="session_end")
            assert sorted((r["device_id"], r["reason"]) for r in ends) == sorted(
                (d.device_id, "upstream_closed") for d in devices
            )
            # The gateway stays up: a device arriving meanwhile is refused, and told why.
            late = make_device("late")
            down = harness.mark()
            with RawClient(gateway.port, late, late.chain, version=5) as client:
                assert client.connect(late.device_id) == Connack(reason_code=0x88)
            (row,) = harness.wait_events(after=down, device_id=late.device_id)
            assert (row["type"], row["reason"]) == ("connect", "upstream_unavailable")
            # The broker is back on the same port: everyone reconnects and publishes.
            mqtt.start()
            back = harness.mark()
            for device, version in zip([*devices, late], [*versions, 5], strict=True):
                with _session(gateway.port, device, version) as client:
                    _publish(client, device, 2)
                    echo = f"devices/{device.device_id}/echo"
                    client.send(Publish(topic=echo, payload=b"back", qos=1, packet_id=3))
                    got = [client.recv(), client.recv()]
                    assert {type(p) for p in got} == {Puback, Publish}
            rows = harness.wait_events(5, after=back, type="connect")
            assert {(r["device_id"], r["reason"]) for r in rows} == {
                (d.device_id, "ok") for d in [*devices, late]
            }
        finally:
            harness.call(gateway.close())


def test_drain_sends_no_unsolicited_pingresp(harness: Harness, make_device: DeviceFactory) -> None:
    device = make_device("drained")
    gateway = harness.start_gateway()
    try:
        with RawClient(gateway.port, device, device.chain, version=5) as client:
            assert client.connect(device.device_id).reason_code == 0
            _publish(client, device, 1)
            harness.call(gateway.drain(within=2))
            assert client.recv() == Disconnect(reason_code=0x8B)  # today: Pingresp() first
            assert client.closed()
    finally:
        harness.call(gateway.close())


# --- SIGTERM under publishing load ---------------------------------------------------------


class Publisher(threading.Thread):
    """QoS 1 until the gateway ends the session; remembers how it ended."""

    def __init__(self, port: int, device: Device, version: int) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port, device, device.chain, version=version)
        assert self.client.connect(device.device_id).reason_code == 0
        self.topic = f"devices/{device.device_id}/load"
        self.acks = 0
        self.pingresps = 0  # never asked for one
        self.ending: object = None

    def run(self) -> None:
        packet_id = 0
        try:
            while True:
                packet_id = packet_id % 65535 + 1
                self.client.send(
                    Publish(topic=self.topic, payload=b"x" * 64, qos=1, packet_id=packet_id)
                )
                reply = self.client.recv(timeout=10)
                while isinstance(reply, Pingresp):  # see test_drain_sends_no_unsolicited_pingresp
                    self.pingresps += 1
                    reply = self.client.recv(timeout=10)
                if not isinstance(reply, Puback):
                    self.ending = reply
                    return
                self.acks += 1
        except Exception as exc:  # the socket going away under a send
            self.ending = exc
        finally:
            self.client.close()


async def _chain_report(url: str, instance: str) -> tuple[dict[str, int], list[tuple]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT chain_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM auth_events"
            " WHERE instance = $1 GROUP BY chain_id",
            instance,
        )
        counts: dict[str, int] = {}
        for row in rows:
            report = await verify_chains(conn, chain_id=row["chain_id"])
            assert report.ok, report.findings
            assert report.events == row["n"]
            assert (row["lo"], row["hi"]) == (1, row["n"])  # no gap, nothing half-written
            counts[row["chain_id"]] = row["n"]
        stored = await conn.fetch(
            "SELECT id, hash, type, reason, device_id FROM auth_events WHERE instance = $1",
            instance,
        )
        return counts, [tuple(r) for r in stored]
    finally:
        await conn.close()


def test_sigterm_under_load_ships_every_event(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path
) -> None:
    devices = asyncio.run(register_devices(database_url, pki, tmp_path, 6))
    with gateway_process(
        pki=pki,
        database_url=database_url,
        upstream=mosquitto_port,
        work=tmp_path / "gw",
        workers=1,
    ) as served:
        publishers = [Publisher(served.port, d, 5 if i % 2 else 4) for i, d in enumerate(devices)]
        for p in publishers:
            p.start()
        wait_for(lambda: all(p.acks >= 20 for p in publishers), timeout=15)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(20) == 0, served.log_text()
        for p in publishers:
            p.join(10)
            assert not p.is_alive()
            if p.client.version == 5:  # drained: DISCONNECT 0x8B (server shutting down)
                assert p.ending == Disconnect(reason_code=0x8B), p.ending
    counts, stored = asyncio.run(_chain_report(database_url, served.instance))
    assert counts, "no events stored"
    by_device = {}
    for _, _, kind, reason, device_id in stored:
        by_device.setdefault(device_id, []).append((kind, reason))
    for device in devices:
        assert sorted(by_device[device.device_id]) == [
            ("connect", "ok"),
            ("session_end", "server_shutting_down"),
        ], by_device[device.device_id]
    # Whatever is left in the spool was shipped: every framed event is stored, same hash,
    # and nothing follows the last valid frame but preallocated zeros.
    stored_hashes = {str(r[0]): r[1] for r in stored}
    spool = tmp_path / "gw" / "spool"
    assert spool.is_dir()
    spooled = 0
    for segment in sorted((tmp_path / "gw" / "spool").rglob("*.seg")):
        data = segment.read_bytes()
        _, payloads, end = read_segment(data)
        assert data[end:].strip(b"\0") == b"", f"half-written record in {segment}"
        for payload in payloads:
            row = decode_payload(payload)
            assert stored_hashes.get(str(row[0])) == row[18]
            spooled += 1
    assert spooled <= sum(counts.values())
