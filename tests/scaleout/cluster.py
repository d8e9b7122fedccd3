"""Three gateway instances (``devicegate serve gateway --workers 2`` each) behind a real
HAProxy with PROXY v2 and round robin, on loopback: the scale-out test's machinery."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.mqtt import Connack, Connect
from tests.conftest import Pki
from tests.gateway.clients import RawClient, client_context
from tests.gateway.conftest import Device
from tests.helpers import free_port, wait_for_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))


@dataclass
class Instance:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in children.read_text().split()]
        return []

    def kill(self) -> None:
        """SIGKILL the supervisor and its workers (one process group), and reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@dataclass
class Cluster:
    instances: list[Instance]
    port: int  # HAProxy's frontend
    haproxy: subprocess.Popen[bytes] | None = None
    stats: Path | None = None
    stopped: list[Instance] = field(default_factory=list)

    def by_name(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def server_status(self) -> dict[str, str]:
        """HAProxy's view of each backend server (``UP``, ``DOWN``, ...)."""
        assert self.stats is not None
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        status: dict[str, str] = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "be_gateways" and row.get("svname") not in ("BACKEND", None):
                status[row["svname"]] = row["status"]
        return status


def _free_pair() -> int:
    """A free port P with P + 1 free too (worker i serves /metrics on P + i)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise OSError("no pair of free ports")


def _start_instance(
    *, name: str, pki: Pki, database_url: str, upstream: int, work: Path
) -> Instance:
    port, metrics = free_port(), _free_pair()
    work.mkdir(parents=True, exist_ok=True)
    policy = work / "policy.toml"
    policy.write_text('[fleets.bench]\nclient_ids = ["{device_id}", "{device_id}-*"]\n')
    env = {
        **os.environ,
        "DEVICEGATE_POLICY_FILE": str(policy),
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_SPOOL_DIR": str(work / "spool"),
        "DEVICEGATE_INSTANCE_ID": name,
        "DEVICEGATE_METRICS_LISTEN": f"127.0.0.1:{metrics}",
        "DEVICEGATE_PROXY_PROTOCOL_FROM": "127.0.0.1/32",
        "DEVICEGATE_DRAIN_TIMEOUT": "2s",
        "DEVICEGATE_LOG_FORMAT": "text",
    }
    log = work / "gateway.log"
    command = [
        DEVICEGATE, "serve", "gateway", "--workers", "2",
        "--listen", f"127.0.0.1:{port}", "--upstream", f"mqtt://127.0.0.1:{upstream}",
    ]  # fmt: skip
    with log.open("wb") as stderr:
        # Its own process group: killing the instance kills its workers with it.
        process = subprocess.Popen(command, env=env, stderr=stderr, start_new_session=True)
    return Instance(name, port, process, log)


def _haproxy_config(frontend: int, instances: list[Instance], stats: Path) -> str:
    servers = "\n".join(
        f"    server {i.name} 127.0.0.1:{i.port} send-proxy-v2 check check-send-proxy"
        " inter 200ms fall 2 rise 2"
        for i in instances
    )
    return f"""
global
    maxconn 2000
    stats socket {stats} mode 600
defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1
frontend fe_mqtt
    bind 127.0.0.1:{frontend}
    default_backend be_gateways
backend be_gateways
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def cluster(
    *, pki: Pki, database_url: str, upstream: int, work: Path, count: int = 3, tag: str = "so"
) -> Iterator[Cluster]:
    instances: list[Instance] = []
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for i in range(count):
            instances.append(
                _start_instance(
                    name=f"{tag}-gw{i}",
                    pki=pki,
                    database_url=database_url,
                    upstream=upstream,
                    work=work / f"gw{i}",
                )
            )
        for instance in instances:
            try:
                wait_for_port(instance.port, timeout=30)
                deadline = time.monotonic() + 30
                while len(instance.workers()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
            except TimeoutError:
                raise AssertionError(instance.log.read_text()) from None
        frontend = free_port()
        config = work / "haproxy.cfg"
        stats = work / "haproxy.sock"
        config.write_text(_haproxy_config(frontend, instances, stats))
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(frontend)
        yield Cluster(instances, frontend, haproxy, stats)
    finally:
        if haproxy is not None:
            haproxy.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                haproxy.wait(5)
            if haproxy.poll() is None:
                haproxy.kill()
                haproxy.wait()
        for instance in instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
        for instance in instances:
            try:
                instance.process.wait(15)
            except subprocess.TimeoutExpired:
                instance.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(instance.process.pid, signal.SIGKILL)  # any worker left behind


def open_client(
    port: int, device: Device, *, source: str, client_id: str | None = None, version: int = 5
) -> tuple[RawClient, str]:
    """An MQTT client connected (CONNACK 0) through ``port`` from ``source``; its address."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    local = f"{source}:{raw.getsockname()[1]}"
    client = RawClient.__new__(RawClient)
    client.version = version
    client.buf = b""
    try:
        context = client_context(device, device.chain)
        client.sock = context.wrap_socket(raw, server_hostname="localhost")
        client.send(Connect(protocol_level=version, client_id=client_id or device.device_id))
        connack = client.recv()
    except BaseException:
        raw.close()
        raise
    if not isinstance(connack, Connack) or connack.reason_code != 0:
        client.close()
        raise ConnectionError(f"not admitted: {connack}")
    return client, local
