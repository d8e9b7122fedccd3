"""``devicegate serve gateway --take-over``: a restart without a gap (real processes, mTLS).

A second gateway on a busy address or state directory is refused with one line; with
``--take-over`` it listens beside the running one on other worker slots, and the old one
drains only once the new workers are ready: a client connecting every ~15 ms is never
refused, every cut device comes back to the new workers, no event is lost and no chain
gets two writers (both instances' chains verify).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from gateway.mqtt.packets import Connack, Connect, Disconnect
from tests.conftest import Pki
from tests.gateway.clients import RawClient
from tests.gateway.conftest import Device, DeviceFactory, Harness
from tests.gateway.served import DEVICEGATE, Served, ServeGateway, verified_chains
from tests.helpers import free_port

HELD = 24  # devices holding a session through the take-over


def _second(served: Served, pki: Pki, url: str, upstream: int, spool: Path, port: int) -> str:
    """Start a plain second gateway; its combined output (it must exit by itself)."""
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_SPOOL_DIR": str(spool),
        "DEVICEGATE_INSTANCE_ID": served.instance,
        "DEVICEGATE_POLICY_SOURCE": "file",
        "DEVICEGATE_LOG_FORMAT": "text",
    }
    command = [
        DEVICEGATE, "serve", "gateway", "--workers", "2", "--listen", f"127.0.0.1:{port}",
        "--upstream", f"mqtt://127.0.0.1:{upstream}",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 1, done
    return (done.stdout + done.stderr).decode()


def test_a_second_gateway_is_refused_with_one_line(
    pki: Pki, database_url: str, mosquitto_port: int, tmp_path: Path, serve: ServeGateway
) -> None:
    with serve(name="first") as served:
        # The same address, another state directory: the probe bind finds the listener.
        output = _second(served, pki, database_url, mosquitto_port, tmp_path / "other", served.port)
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1, output
        assert f"cannot listen on 127.0.0.1:{served.port}" in lines[0]
        assert "--take-over" in lines[0]
        # Another address, the same state directory: its supervisor holds the claim.
        free = served.port + 1 if served.port < 65535 else served.port - 1
        output = _second(served, pki, database_url, mosquitto_port, tmp_path / "spool", free)
        lines = [line for line in output.splitlines() if line.strip()]
        assert len(lines) == 1, output
        assert "a gateway already runs on the state directory" in lines[0]
        assert str(served.process.pid) in lines[0]
        # The first one still serves both workers, untouched.
        assert served.process.poll() is None
        assert len(served.workers()) == 2


def _wait_spools_free(spool_dir: Path, slots: int) -> None:
    """Wait (bounded) until no process holds the spool lock of slots 0..slots-1."""
    deadline = time.monotonic() + 10
    for slot in range(slots):
        lock = spool_dir / f"w{slot}" / "lock"
        while lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{lock} still held"
                time.sleep(0.02)
            finally:
                os.close(fd)


def test_a_stale_claim_does_not_block(
    tmp_path: Path, make_device: DeviceFactory, serve: ServeGateway
) -> None:
    with serve(name="stale") as served:
        claim = tmp_path / "spool" / "supervisor.0.pid"
        assert claim.read_text().split()[0] == str(served.process.pid)
        for pid in served.workers():
            os.kill(pid, signal.SIGKILL)
        served.process.kill()
        served.process.wait()
    assert claim.exists()  # left behind by the dead supervisor
    # A killed worker holds its spool's lock until its last thread is gone, a few ms after
    # it is reaped: a start in that window would see the spool taken (its worker retries).
    _wait_spools_free(tmp_path / "spool", 2)
    device = make_device("stale", fleet="bench")
    with serve(name="stale-again", like=served) as again:
        assert claim.read_text().split()[0] == str(again.process.pid)
        _connect_once(again.port, device, device.device_id)


def _connect_once(port: int, device: Device, client_id: str) -> None:
    with RawClient(port, device, device.chain) as client:
        assert client.connect(client_id).reason_code == 0
        client.send(Disconnect())


class Holder(threading.Thread):
    """A device that holds a session and reconnects at once whenever it is cut."""

    def __init__(self, port: int, device: Device, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.device, self.stop = port, device, stop
        self.connects = 0  # CONNACK 0 received
        self.failures: Counter[str] = Counter()
        self.cut_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 120  # bounded
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with RawClient(self.port, self.device, self.device.chain) as client:
                    client.send(Connect(protocol_level=4, client_id=self.device.device_id))
                    answer = client.recv()
                    if answer is None:  # not admitted yet when a drain ended it: reconnect
                        self.failures["closed before CONNACK"] += 1
                        continue
                    if not isinstance(answer, Connack) or answer.reason_code != 0:
                        self.failures["connack"] += 1
                        continue
                    self.connects += 1
                    while not self.stop.is_set():
                        try:
                            if client.recv(timeout=0.2) is None:
                                break  # cut (DISCONNECT 0x8B or close): reconnect
                        except TimeoutError:
                            continue
                    if self.stop.is_set():
                        client.send(Disconnect())
                        return
                    self.cut_at = time.monotonic()
            except ConnectionRefusedError:
                self.failures["ECONNREFUSED"] += 1
                time.sleep(0.05)
            except (OSError, AttributeError) as exc:  # reset, or closed in the TLS handshake
                self.failures[type(exc).__name__] += 1
                time.sleep(0.05)


class Prober(threading.Thread):
    """A new mTLS MQTT connection every ~15 ms: what a device arriving now would see."""

    def __init__(self, port: int, device: Device, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.device, self.stop = port, device, stop
        self.outcomes: Counter[str] = Counter()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            begun = time.monotonic()
            i += 1
            try:
                _connect_once(self.port, self.device, f"{self.device.device_id}-p{i}")
                self.outcomes["ok"] += 1
            except ConnectionRefusedError:
                self.outcomes["ECONNREFUSED"] += 1
            except (OSError, AssertionError, AttributeError) as exc:
                self.outcomes[type(exc).__name__] += 1
            time.sleep(max(0.0, 0.015 - (time.monotonic() - begun)))


def _connects(harness: Harness, instance: str) -> dict[str, list[str]]:
    """Allowed connect events per client id: the writing chains' names, in time order."""
    rows = harness.query(
        "SELECT client_id, chain_id FROM auth_events WHERE instance = $1 AND type = 'connect'"
        " AND outcome = 'allowed' ORDER BY time",
        instance,
    )
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["client_id"], []).append(row["chain_id"].partition("#")[0])
    return found


def test_take_over_without_a_gap(
    database_url: str, harness: Harness, make_device: DeviceFactory, serve: ServeGateway
) -> None:
    devices = [make_device(f"hold{i}", fleet="bench") for i in range(HELD)]
    probe_device = make_device("probe", fleet="bench")
    stop = threading.Event()
    with serve(name="old") as old:
        instance = old.instance
        holders = [Holder(old.port, device, stop) for device in devices]
        for holder in holders:
            holder.start()
        deadline = time.monotonic() + 60
        while any(h.connects < 1 for h in holders) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(h.connects == 1 for h in holders), [h.failures for h in holders]
        prober = Prober(old.port, probe_device, stop)
        prober.start()
        try:
            with serve(name="new", like=old, take_over=True) as new:
                # The old supervisor is told to stop once the new workers are ready; its
                # drain cuts every held session (DISCONNECT/close), and it exits 0.
                assert old.process.wait(90) == 0, old.log.read_text()
                deadline = time.monotonic() + 60
                while any(h.connects < 2 for h in holders) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)  # a few more probes against the new instance alone
                stop.set()
                prober.join(10)
                for holder in holders:
                    holder.join(10)
                assert all(h.connects == 2 for h in holders), [
                    (h.connects, h.failures) for h in holders
                ]
                assert prober.outcomes["ECONNREFUSED"] == 0, prober.outcomes
                assert not any(h.failures["ECONNREFUSED"] for h in holders)
                assert prober.outcomes["ok"] >= 20, prober.outcomes
                new.stop()
        finally:
            stop.set()
    logs = old.log.read_text() + new.log.read_text()
    assert "ChainTaken" not in logs and "Traceback" not in logs, logs
    assert "stopping the old gateway" in new.log.read_text()

    # Every CONNACK 0 a client saw has its connect event; each held device's first was
    # written by an old worker (w0, w1), its second by a new one (w2, w3).
    connects = _connects(harness, instance)
    old_chains = {f"{instance}/w0", f"{instance}/w1"}
    new_chains = {f"{instance}/w2", f"{instance}/w3"}
    for device in devices:
        chains = connects.get(device.device_id, [])
        assert len(chains) == 2, (device.device_id, chains)
        assert chains[0] in old_chains and chains[1] in new_chains, chains
    # The old instance's drain recorded each cut session's end (no will: a DISCONNECT to
    # the broker), on its own chains.
    ends = harness.query(
        "SELECT client_id, chain_id FROM auth_events WHERE instance = $1"
        " AND type = 'session_end' AND reason = 'server_shutting_down'",
        instance,
    )
    ended = {row["client_id"]: row["chain_id"].partition("#")[0] for row in ends}
    for device in devices:
        assert ended.get(device.device_id) in old_chains, (device.device_id, ended)
    probes = sum(1 for client_id in connects if client_id.startswith(probe_device.device_id))
    assert probes >= prober.outcomes["ok"]
    # Both instances' chains verify: four writers, one each, no gap.
    counts = asyncio.run(verified_chains(database_url, instance))
    assert {chain.partition("#")[0] for chain in counts} == old_chains | new_chains, counts


def test_a_take_over_that_never_gets_ready_is_abandoned(
    make_device: DeviceFactory, serve: ServeGateway
) -> None:
    device = make_device("abandon", fleet="bench")
    with serve(name="stays") as old:
        workers = old.workers()
        # The new instance's broker is unreachable: its workers are never ready, so they
        # never listen, and the old gateway is never told to stop.
        with serve(
            upstream_port=free_port(),
            name="never-ready",
            like=old,
            take_over=True,
            env={"DEVICEGATE_TAKEOVER_WITHIN": "3s"},
        ) as new:
            for i in range(10):  # meanwhile every connection is the old one's
                _connect_once(old.port, device, f"{device.device_id}-{i}")
            assert new.process.wait(60) == 1, new.log.read_text()
        log = new.log.read_text()
        assert "take-over abandoned" in log and "gateway listening" not in log, log
        assert old.process.poll() is None and old.workers() == workers
        _connect_once(old.port, device, device.device_id)
