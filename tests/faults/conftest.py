"""Fault acceptance machinery (issue 5): real ``devicegate serve gateway`` processes, real
PostgreSQL and Mosquitto, devices registered in a scratch database, and an asyncio MQTT
client that reports exactly what each connection attempt saw.

Each attempt uses a client id of its own (``<device_id>-<tag>``, allowed by the policy
file written here), so every attempt can be matched to its ``connect`` event 1:1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pwd
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway.events.spool import SpoolError, read_segment
from gateway.mqtt import NEED_DATA, Connack, Connect, Disconnect, decode, encode
from provisioning.audit.verify import VerifyReport, verify_chains
from provisioning.pki.ca import fingerprint
from tests.conftest import ADMIN_URL, Pki, _create_database, _drop_database
from tests.gateway.clients import client_context
from tests.gateway.conftest import Device, issue
from tests.helpers import Proxy, free_port, wait_for_port

DEVICEGATE = str(Path(sys.executable).with_name("devicegate"))
FLEET = "faults"
T = TypeVar("T")
POLICY = f'[fleets.{FLEET}]\nclient_ids = ["{{device_id}}", "{{device_id}}-*"]\n'


# --- a scratch database ---------------------------------------------------------------


def pg_ready(timeout: float = 0.0) -> bool:
    """Whether PostgreSQL accepts connections (waits up to ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(
            ["pg_isready", "-q", "-d", ADMIN_URL], capture_output=True, check=False
        )
        if probe.returncode == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


@dataclass(frozen=True)
class PostgresCluster:
    """The local Debian cluster (``pg_ctlcluster``) that serves the test database."""

    version: str
    name: str

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        """Fast shutdown: every session is disconnected, then the server is down."""
        self._ctl("stop", "-m", "fast")
        assert not pg_ready(), "PostgreSQL still accepts connections after stop"

    def start(self) -> None:
        """Start, and return once it accepts connections."""
        self._ctl("start")
        if not pg_ready(timeout=30):
            raise TimeoutError("PostgreSQL did not accept connections 30 s after start")

    def ensure_running(self) -> None:
        """Start it if it is down (idempotent: every teardown calls it)."""
        if not pg_ready(timeout=1):
            with contextlib.suppress(subprocess.CalledProcessError):  # already starting
                self._ctl("start")
        if not pg_ready(timeout=60):
            raise RuntimeError("PostgreSQL is down and did not come back: later tests fail")


def find_cluster() -> PostgresCluster | None:
    """The cluster listening on the test server's port, if it is local and controllable."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        return None
    parts = urlsplit(ADMIN_URL)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[2] == str(parts.port or 5432) and fields[3] == "online":
            if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != fields[4]:
                return None  # pg_ctlcluster needs root or the cluster's owner
            return PostgresCluster(fields[0], fields[1])
    return None


@pytest.fixture
def fault_db() -> Iterator[str]:
    """A migrated database of this test's own; dropped once PostgreSQL is back up."""
    name = f"dg_test_fault_{secrets.token_hex(4)}"
    url = asyncio.run(_create_database(name, migrated=True))
    yield url
    if not pg_ready(timeout=1):  # a test that stopped PostgreSQL failed to restart it
        cluster = find_cluster()
        if cluster is not None:
            cluster.ensure_running()
    asyncio.run(_drop_database(name))


async def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One query on a fresh connection (nothing pooled survives a PostgreSQL restart)."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def register_device(
    conn: asyncpg.Connection,
    pki: Pki,
    directory: Path,
    device_id: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Device:
    """One device of fleet `FLEET` with a certificate from the test CA, registered active
    (validity as `tests.gateway.conftest.issue` defaults it, unless given)."""
    cert_path, key_path, cert = issue(
        pki.ca, directory, device_id, FLEET, not_before=not_before, not_after=not_after
    )
    serial, fp = format(cert.serial_number, "x"), fingerprint(cert)
    await conn.execute("INSERT INTO fleets (name) VALUES ($1) ON CONFLICT DO NOTHING", FLEET)
    await conn.execute(
        "INSERT INTO devices (device_id, fleet, status) VALUES ($1, $2, 'active')",
        device_id,
        FLEET,
    )
    await conn.execute(
        "INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before,"
        " not_after, status, key_type, pem) VALUES ($1, $2, $3, $4, $5, 'active',"
        " 'ec-p256', $6)",
        serial,
        device_id,
        fp,
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
        cert_path.read_text(),
    )
    return Device(device_id, FLEET, cert_path, key_path, pki.chain, serial, fp)


async def register_devices(url: str, pki: Pki, directory: Path, count: int) -> list[Device]:
    """``count`` devices of fleet `FLEET` with certificates from the test CA, registered."""
    conn = await asyncpg.connect(url)
    try:
        return [
            await register_device(conn, pki, directory, f"fault{n}-{secrets.token_hex(3)}")
            for n in range(count)
        ]
    finally:
        await conn.close()


# --- the gateway as operators run it -------------------------------------------------


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    instance: str
    log: Path

    def workers(self) -> dict[int, int]:
        """Live worker processes: worker index -> pid (children of the supervisor)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found: dict[int, int] = {}
        with contextlib.suppress(OSError):
            for pid in map(int, children.read_text().split()):
                with contextlib.suppress(OSError, ValueError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"--worker-index" in argv:
                        found[int(argv[argv.index(b"--worker-index") + 1])] = pid
        return found

    def chain(self, index: int) -> str:
        """Worker ``index``'s chain id: ``<instance>/w<index>#<random>``, the random part
        made with its spool (read from a segment header)."""
        assert self.log is not None
        spool = self.log.parent / "spool" / f"w{index}"
        for segment in sorted(spool.glob("*.seg")):
            with contextlib.suppress(SpoolError):
                return str(read_segment(segment.read_bytes())[0]["chain_id"])
        raise AssertionError(f"no spool segment in {spool}")

    def log_text(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:]


@contextlib.contextmanager
def gateway_process(
    *,
    pki: Pki,
    database_url: str,
    upstream: int,
    work: Path,
    workers: int = 2,
    env: dict[str, str] | None = None,
) -> Iterator[GatewayProcess]:
    """``devicegate serve gateway --workers N``; SIGTERM (then SIGKILL) on exit."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    instance = f"fault-{os.getpid()}-{port}"
    policy = work / "policy.toml"
    policy.write_text(POLICY)
    environment = {
        **os.environ,
        "DEVICEGATE_POLICY_FILE": str(policy),
        "DEVICEGATE_DATABASE_URL": database_url,
        "DEVICEGATE_PKI_DIR": str(pki.directory),
        "DEVICEGATE_SPOOL_DIR": str(work / "spool"),
        "DEVICEGATE_INSTANCE_ID": instance,
        "DEVICEGATE_METRICS_LISTEN": "off",
        "DEVICEGATE_DRAIN_TIMEOUT": "2s",
        "DEVICEGATE_LOG_FORMAT": "text",
        # These faults are driven by a few devices reconnecting hundreds of times: the
        # per-device connect budget (tests/gateway/test_connect_budget*) would refuse them.
        "DEVICEGATE_DEVICE_CONNECTS_PER_MINUTE": "0",
        **(env or {}),
    }
    log = work / "gateway.log"
    command = [
        DEVICEGATE, "serve", "gateway", "--workers", str(workers),
        "--listen", f"127.0.0.1:{port}", "--upstream", f"mqtt://127.0.0.1:{upstream}",
    ]  # fmt: skip
    with log.open("wb") as stderr:
        # Its own process group: the teardown can kill workers the supervisor left behind.
        process = subprocess.Popen(command, env=environment, stderr=stderr, start_new_session=True)
    served = GatewayProcess(process, port, instance, log)
    try:
        try:
            wait_for_port(port, timeout=30)
            deadline = time.monotonic() + 30
            while workers > 1 and len(served.workers()) < workers:
                if time.monotonic() > deadline:
                    raise TimeoutError("workers did not start")
                time.sleep(0.05)
        except TimeoutError:
            raise AssertionError(served.log_text()) from None
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # any worker left behind


# --- a client that reports what it saw ----------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One connection attempt: its client id, what came back, when (monotonic)."""

    client_id: str
    device_id: str
    version: int
    outcome: str  # "ok", "connack:0xNN", "closed" (no CONNACK), "error:<type>"
    started: float
    ended: float

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class Client:
    """A device's TLS context, built once; `attempt` connects, and disconnects at once."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.context = client_context(device, device.chain)

    async def attempt(
        self, port: int, tag: str, *, version: int = 4, hold: float = 0.0, timeout: float = 10.0
    ) -> Attempt:
        client_id = f"{self.device.device_id}-{tag}"
        started = time.monotonic()
        outcome = await self._attempt(port, client_id, version, hold, timeout)
        return Attempt(
            client_id, self.device.device_id, version, outcome, started, time.monotonic()
        )

    async def until_admitted(self, port: int, *, within: float = 30.0) -> list[Attempt]:
        """Attempts (``back<n>``) every 0.2 s until one is admitted or ``within`` seconds
        pass: the recovery after a fault. The last one is the admitted one, if any."""
        attempts: list[Attempt] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            attempts.append(await self.attempt(port, f"back{len(attempts)}"))
            if attempts[-1].ok:
                break
            await asyncio.sleep(0.2)
        return attempts

    async def _attempt(
        self, port: int, client_id: str, version: int, hold: float, timeout: float
    ) -> str:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=self.context, server_hostname="localhost"
                )
                writer.write(
                    encode(Connect(protocol_level=version, client_id=client_id), version=version)
                )
                packet = await _first_packet(reader, version)
                if packet is None:
                    return "closed"
                if not isinstance(packet, Connack):
                    return f"unexpected:{type(packet).__name__}"
                if packet.reason_code != 0:
                    return f"connack:0x{packet.reason_code:02x}"
                if hold:
                    await asyncio.sleep(hold)
                writer.write(encode(Disconnect(), version=version))
                await writer.drain()
                return "ok"
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            return f"error:{type(exc).__name__}"
        finally:
            if writer is not None:
                writer.transport.abort()  # no TLS close_notify dance: the gateway copes


async def _first_packet(reader: asyncio.StreamReader, version: int) -> object | None:
    buf = b""
    while True:
        try:
            data = await reader.read(65536)
        except (ConnectionError, ssl.SSLError):
            return None
        if not data:
            return None
        buf += data
        result = decode(buf, version=version)
        if result is not NEED_DATA:
            packet, _ = result
            return packet


async def wait_until(check: Callable[[], Awaitable[T]], timeout: float, step: float = 0.1) -> T:
    """Await ``check()`` until it returns something truthy; its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def connect_events(url: str, instance: str) -> list[asyncpg.Record]:
    return await query(
        url,
        "SELECT id, client_id, device_id, outcome, reason, chain_id, seq, type, time"
        " FROM auth_events WHERE instance = $1 ORDER BY chain_id, seq",
        instance,
    )


class ThreadedProxy:
    """`tests.helpers.Proxy` on an event loop of its own thread, driven from sync code.

    The gateway under test is a subprocess that keeps talking to PostgreSQL while the test
    blocks (waiting for a port, running clients): the proxy must relay meanwhile.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        self._call(self._proxy.start())
        user = f"{parts.username}@" if parts.username else ""
        self.url = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self._proxy.port}"))

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def cut(self) -> None:
        self._call(self._proxy.cut())

    def restore(self) -> None:
        self._call(self._proxy.restore())

    def close(self) -> None:
        self._call(self._proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def landed(url: str, instance: str, client_ids: set[str]) -> list[asyncpg.Record] | None:
    """The instance's events once every one of ``client_ids`` has a ``connect`` event."""
    rows = await connect_events(url, instance)
    stored = {r["client_id"] for r in rows if r["type"] == "connect"}
    return rows if client_ids <= stored else None


async def verify(url: str) -> VerifyReport:
    """`devicegate audit verify` over the whole database."""
    conn = await asyncpg.connect(url)
    try:
        return await verify_chains(conn)
    finally:
        await conn.close()


def run_bounded(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """``asyncio.run(coro)``, failing after ``timeout`` s with every task's stack (a hang
    must fail the test and say where it hangs, not stall the suite)."""

    async def guarded() -> T:
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait([task], timeout=timeout)
        if done:
            return task.result()
        stacks = io.StringIO()
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.print_stack(limit=8, file=stacks)
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 5)
        raise AssertionError(f"hung for {timeout} s; tasks:\n{stacks.getvalue()}")

    return asyncio.run(guarded())


SINK_DEATH = re.compile(r".*event sink task \S+ died: InternalClientError.*")


def assert_sink_alive(log: str) -> None:
    """The shipping task survived: asyncpg's InternalClientError (the server ended the
    connection mid-transaction) once killed it and left the worker refusing everyone."""
    death = SINK_DEATH.search(log)
    assert death is None, f"the event sink's shipping task died: {death.group(0)}"
