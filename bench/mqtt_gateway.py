"""Benchmark: the gateway (``--workers 2``) beside Mosquitto's own mTLS listener.

One run, same PKI (``provisioning.pki.directory.init_pki``), same load generator, on this machine:

- ``handshakes/s``: TLS (device certificate) + CONNECT + CONNACK + DISCONNECT + close,
  from ``--procs`` load processes with ``--concurrency`` loops each; the load generator's
  share of the machine's CPU is printed beside it. The generator is lean (one epoll loop
  over OpenSSL-driven sockets, no server certificate verification: `handshake_worker`),
  because on this machine it competes with the servers for the same cores.
- ``qos0 msg/s`` and ``qos1 msg/s`` delivered: ``--pairs`` publisher/subscriber pairs
  (publisher -> broker -> subscriber), through the gateway (upstream: a plain Mosquitto)
  vs straight to Mosquitto's mTLS listener; counted at the subscribers in a steady window.
- ``rtt p50/p99``: one client publishes QoS 0 to a topic it subscribes to and waits for it,
  sequentially.
- ``KB/session``: RSS delta (``/proc``, summed over the gateway workers) from holding
  ``--sessions`` idle mTLS sessions, vs Mosquitto's RSS delta for the same.

Targets (issue 6): handshakes >= 1.0x Mosquitto, QoS 0 delivered >= 0.6x direct, added
p99 <= 0.3 ms, memory per session <= 1.5x Mosquitto. ``make bench`` runs the bounded
default (about two minutes); ``--full`` holds 10,000 sessions, longer windows.

Usage: .venv/bin/python bench/mqtt_gateway.py [--full] [--sessions N] [--seconds S]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.agent.device import present_own_chain
from provisioning.pki.ca import DeviceIdentity, SignOptions, fingerprint
from provisioning.pki.directory import init_pki, load_ca
from schemas.migrate import migrate

ADMIN_URL = os.environ.get(
    "DEVICEGATE_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PASSPHRASE = b"bench-passphrase-not-secret"
TRUST_DOMAIN = "devicegate.local"
FLEET = "bench"
ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 64
LOADGEN_SOURCE = ROOT / "bench" / "loadgen" / "handshake.c"
HOLD_PER_PROCESS = 10_000  # sessions one memory-load process holds (its fds, its loop)


# --- MQTT 3.1.1 bytes (the load generator writes them directly: it must not be the limit) --


def _rl(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_frame(client_id: str, keepalive: int = 600) -> bytes:
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _str(client_id)
    return b"\x10" + _rl(len(body)) + body


def publish_frame(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + _rl(len(body)) + body


def subscribe_frame(topic: str, qos: int) -> bytes:
    body = struct.pack("!H", 1) + _str(topic) + bytes([qos])
    return b"\x82" + _rl(len(body)) + body


DISCONNECT = b"\xe0\x00"


# --- setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pids: tuple[int, ...]  # the serving processes (CPU; RSS too unless `rss_pids`)
    rss_pids: tuple[int, ...] = ()  # processes whose RSS counts (the gateway's supervisor too)

    @property
    def memory_pids(self) -> tuple[int, ...]:
        return self.rss_pids or self.pids


@dataclass(frozen=True)
class Device:
    device_id: str
    cert: str
    key: str


@dataclass(frozen=True)
class Env:
    chain: str
    devices: tuple[Device, ...]
    handshake_loadgen: Path | None = None  # the C generator; None: the Python one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def make_devices(pki: Path, out: Path, count: int) -> list[tuple[Device, Any]]:
    ca = load_ca(pki, PASSPHRASE)
    now = datetime.now(UTC)
    devices = []
    for i in range(count):
        device_id = f"bench-{i:04d}-{secrets.token_hex(2)}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.issue_device_certificate(
            key.public_key(),
            DeviceIdentity(device_id, FLEET, TRUST_DOMAIN),
            SignOptions(not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=1)),
        )
        cert_path, key_path = out / f"{device_id}.crt", out / f"{device_id}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        devices.append((Device(device_id, str(cert_path), str(key_path)), cert))
    return devices


async def create_database(name: str, devices: list[tuple[Device, Any]]) -> str:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = ADMIN_URL.rpartition("/")[0] + "/" + name
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO fleets (name) VALUES ($1)", FLEET)
        for device, cert in devices:
            await conn.execute(
                "INSERT INTO devices (device_id, fleet, status) VALUES ($1, $2, 'active')",
                device.device_id,
                FLEET,
            )
            await conn.execute(
                "INSERT INTO certificates (serial, device_id, fingerprint_sha256, not_before,"
                " not_after, status, key_type, pem) VALUES ($1, $2, $3, $4, $5, 'active',"
                " 'ec-p256', $6)",
                format(cert.serial_number, "x"),
                device.device_id,
                fingerprint(cert),
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
                cert.public_bytes(serialization.Encoding.PEM).decode(),
            )
    finally:
        await conn.close()
    return url


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.contextmanager
def mosquitto(work: Path, port: int, tls: Path | None) -> Iterator[subprocess.Popen[bytes]]:
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "log_dest none",
        "max_queued_messages 0",
        "max_inflight_messages 100",
        "max_connections -1",
        "set_tcp_nodelay true",  # as the gateway does; else Nagle adds 40 ms to CONNACK
    ]
    if os.geteuid() == 0:  # else it drops to user mosquitto, who cannot read the key
        lines.append("user root")
    if tls is not None:
        lines += [
            f"cafile {tls / 'chain.pem'}",
            f"certfile {tls / 'server.crt'}",
            f"keyfile {tls / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    config = work / f"mosquitto-{port}.conf"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        ["mosquitto", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_raise_fd_limit,
    )
    try:
        wait_for_port(port)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def children(pid: int) -> tuple[int, ...]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return tuple(int(p) for p in path.read_text().split())


def rss_kb(pids: tuple[int, ...]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pids: tuple[int, ...]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# --- the load generator (each function runs in its own process, on uvloop) ---------------


def client_context(env: Env, device: Device) -> ssl.SSLContext:
    """A devicegate device's context: it sends its certificate, not chain.pem's CAs."""
    context = ssl.create_default_context(cafile=env.chain)
    context.load_cert_chain(device.cert, device.key)
    present_own_chain(context)
    return context


class Reader(asyncio.Protocol):
    """Counts bytes and wakes a waiter once ``want`` bytes have arrived."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and len(self.buf) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def read(self, n: int) -> bytes:
        if len(self.buf) < n:
            self.want = n
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, 10)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def open_mqtt(
    port: int,
    context: ssl.SSLContext,
    client_id: str,
    protocol: type[Reader] = Reader,
    source: str | None = None,
) -> Reader:
    loop = asyncio.get_running_loop()
    _, reader = await loop.create_connection(
        protocol,
        "127.0.0.1",
        port,
        ssl=context,
        server_hostname="localhost",
        local_addr=(source, 0) if source else None,
    )
    assert reader.transport is not None
    reader.transport.write(connect_frame(client_id))
    connack = await reader.read(4)
    if connack[3] != 0:
        raise ConnectionError(f"CONNACK {connack[3]}")
    return reader


def lean_client_context(device: Device) -> ssl.SSLContext:
    """The handshake generator's context: the device's certificate, no server verification.

    The server's side is unchanged (it sends and proves its certificate, and verifies the
    device's); the generator just skips the chain and hostname checks it would otherwise
    pay for on every handshake, CPU the servers under test compete for on this machine.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(device.cert, device.key)
    return context


class _Handshake:
    """One TLS + CONNECT + CONNACK + DISCONNECT attempt on a non-blocking socket."""

    __slots__ = ("buf", "connected", "mask", "sock", "started")

    def __init__(self, context: ssl.SSLContext, port: int, poller: select.epoll) -> None:
        self.started = time.monotonic()
        self.buf = b""
        self.connected = False  # the TLS handshake is done and CONNECT sent
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock = context.wrap_socket(raw, do_handshake_on_connect=False)
        sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS: the handshake waits for it
        self.mask = select.EPOLLOUT
        poller.register(sock.fileno(), self.mask)

    def _want(self, poller: select.epoll, mask: int) -> None:
        if mask != self.mask:
            self.mask = mask
            poller.modify(self.sock.fileno(), mask)

    def step(self, poller: select.epoll, connect: bytes) -> bool | None:
        """Advance on readiness: True done, False failed, None not yet."""
        sock = self.sock
        try:
            if not self.connected:
                sock.do_handshake()
                sock.send(connect)
                self.connected = True
            data = sock.recv(256)
        except ssl.SSLWantReadError:
            self._want(poller, select.EPOLLIN)
            return None
        except ssl.SSLWantWriteError:
            self._want(poller, select.EPOLLOUT)
            return None
        except ssl.SSLError:
            return False
        except OSError as exc:  # refused, reset, or the TCP connect is still under way
            under_way = exc.errno == errno.ENOTCONN and time.monotonic() - self.started < 10
            if under_way and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                return None
            return False
        if not data:
            return False
        self.buf += data
        if len(self.buf) < 4:
            return None
        if self.buf[3] != 0:
            return False
        with contextlib.suppress(OSError):
            sock.send(DISCONNECT)
        return True

    def close(self, poller: select.epoll) -> None:
        with contextlib.suppress(OSError, ValueError):
            poller.unregister(self.sock.fileno())
        self.sock.close()


def handshake_worker(
    env: Env, port: int, devices: list[Device], seconds: float, queue: Any
) -> None:
    """``len(devices)`` handshake loops, one per device, until ``seconds`` have passed.

    Lean on purpose (the same for both servers): one epoll loop over non-blocking sockets
    whose TLS OpenSSL runs directly (``SSLSocket``, no event loop, no memory BIO copies),
    contexts built once, no server certificate verification (see `lean_client_context`).
    An attempt that has not finished 10 s after it started counts as failed.
    """
    contexts = [lean_client_context(device) for device in devices]
    connect = [connect_frame(f"{device.device_id}-h") for device in devices]
    poller = select.epoll()
    live: dict[int, tuple[int, _Handshake]] = {}
    done = failed = 0
    deadline = time.monotonic() + seconds
    swept = time.monotonic()

    def start(slot: int) -> None:
        attempt = _Handshake(contexts[slot], port, poller)
        live[attempt.sock.fileno()] = (slot, attempt)

    for slot in range(len(devices)):
        start(slot)
    while live:
        now = time.monotonic()
        if now > deadline + 10:
            failed += len(live)
            break
        for fd, _ in poller.poll(0.5):
            slot, attempt = live[fd]
            result = attempt.step(poller, connect[slot])
            if result is None:
                continue
            del live[fd]
            attempt.close(poller)
            if result:
                done += 1
            else:
                failed += 1
            if time.monotonic() < deadline:
                start(slot)
        if now - swept < 1:
            continue
        swept = now
        for fd, (slot, attempt) in list(live.items()):
            if now - attempt.started > 10:  # stuck: count it and move on
                del live[fd]
                attempt.close(poller)
                failed += 1
                if now < deadline:
                    start(slot)
    for _, attempt in live.values():
        attempt.close(poller)
    poller.close()
    queue.put((done, failed, time.process_time()))


def hold_worker(
    env: Env,
    port: int,
    device: Device,
    ids: list[str],
    source: str,
    queue: Any,
    release: EventType,
) -> None:
    """Hold ``ids`` sessions from loopback address ``source`` (each process its own: one
    source address has ~28,000 ephemeral ports towards one server port)."""
    _raise_fd_limit()

    async def main() -> None:
        context = client_context(env, device)
        gate = asyncio.Semaphore(64)
        held: list[Reader] = []
        failed = 0

        async def one(client_id: str) -> None:
            nonlocal failed
            async with gate:
                try:
                    held.append(await open_mqtt(port, context, client_id, source=source))
                except (OSError, ConnectionError, TimeoutError, ssl.SSLError):
                    failed += 1

        await asyncio.gather(*(one(i) for i in ids))
        queue.put((len(held), failed))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, release.wait)
        for reader in held:
            assert reader.transport is not None
            reader.transport.close()
        await asyncio.sleep(0.2)

    uvloop.run(main())


def pair_worker(
    env: Env,
    port: int,
    device: Device,
    qos: int,
    seconds: float,
    warmup: float,
    queue: Any,
) -> None:
    """One publisher and one subscriber on ``devices/<id>/bench``; counts deliveries."""

    async def main() -> None:
        context = client_context(env, device)
        topic = f"devices/{device.device_id}/bench"
        frame = publish_frame(topic, PAYLOAD, qos, 1)
        frame_len = len(frame)
        sub = await open_mqtt(port, context, f"{device.device_id}-sub")
        assert sub.transport is not None
        sub.transport.write(subscribe_frame(topic, qos))
        await sub.read(5)  # SUBACK
        pub = await open_mqtt(port, context, f"{device.device_id}-pub")
        assert pub.transport is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        window_start, window_end = start + warmup, start + warmup + seconds
        state = {"received": 0, "in_window": 0, "acked": 0}
        sub_transport = sub.transport

        def on_sub(data: bytes) -> None:
            sub.buf += data
            n = len(sub.buf) // frame_len
            if not n:
                return
            if qos:
                acks = bytearray()
                buf = sub.buf
                offset = frame_len - len(PAYLOAD) - 2
                for i in range(n):
                    p = i * frame_len + offset
                    acks += b"\x40\x02" + buf[p : p + 2]
                sub_transport.write(bytes(acks))
            del sub.buf[: n * frame_len]
            state["received"] += n
            now = loop.time()
            if window_start <= now < window_end:
                state["in_window"] += n

        sub.data_received = on_sub  # type: ignore[method-assign]
        stop = False
        if qos == 0:
            batch = frame * 128
            pub_transport = pub.transport
            while loop.time() < window_end:
                pub_transport.write(batch)
                if pub_transport.get_write_buffer_size() > 256 * 1024:
                    await asyncio.sleep(0)
                    while pub_transport.get_write_buffer_size() > 64 * 1024:  # noqa: ASYNC110
                        await asyncio.sleep(0.001)
                else:
                    await asyncio.sleep(0)
        else:
            frames = [publish_frame(topic, PAYLOAD, 1, pid) for pid in range(1, 65536)]
            next_id = [0]
            pub_transport = pub.transport

            def send(n: int) -> None:
                i = next_id[0]
                chunk = frames[i : i + n]
                if len(chunk) < n:
                    chunk += frames[: n - len(chunk)]
                next_id[0] = (i + n) % len(frames)
                pub_transport.write(b"".join(chunk))

            def on_pub(data: bytes) -> None:
                pub.buf += data
                n = len(pub.buf) // 4
                del pub.buf[: n * 4]
                state["acked"] += n
                if not stop:
                    send(n)

            pub.data_received = on_pub  # type: ignore[method-assign]
            send(200)
            while loop.time() < window_end:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            stop = True
        queue.put((state["in_window"], seconds))
        pub.transport.close()
        sub_transport.close()
        await asyncio.sleep(0.1)

    uvloop.run(main())


def rtt_worker(env: Env, port: int, device: Device, rounds: int, queue: Any) -> None:
    async def main() -> None:
        context = client_context(env, device)
        topic = f"devices/{device.device_id}/rtt"
        reader = await open_mqtt(port, context, f"{device.device_id}-rtt")
        assert reader.transport is not None
        reader.transport.write(subscribe_frame(topic, 0))
        await reader.read(5)
        frame = publish_frame(topic, PAYLOAD, 0)
        samples = []
        for i in range(rounds + 200):
            t0 = time.perf_counter()
            reader.transport.write(frame)
            await reader.read(len(frame))
            if i >= 200:
                samples.append(time.perf_counter() - t0)
        reader.transport.close()
        queue.put(samples)

    uvloop.run(main())


# --- the measurements ------------------------------------------------------------------


def run_procs(target: Any, args_list: list[tuple[Any, ...]], timeout: float) -> list[Any]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for args in args_list]
    for p in procs:
        p.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(10)
    return results


def build_handshake_loadgen(work: Path) -> Path | None:
    """Compile bench/loadgen/handshake.c; None (use `handshake_worker`) if it can't be."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("no C compiler: the handshake load generator is the Python one", flush=True)
        return None
    binary = work / "handshake"
    built = subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(LOADGEN_SOURCE), "-lssl", "-lcrypto"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        reason = (built.stderr.strip().splitlines() or ["?"])[-1]
        print(f"C load generator not built ({reason}; libssl-dev missing?): using the "
              "Python one", flush=True)  # fmt: skip
        return None
    return binary


def run_handshake_loadgen(
    binary: Path, port: int, groups: list[list[Device]], seconds: float
) -> list[tuple[int, int, float]]:
    """One C generator process per group of devices: (done, failed, CPU seconds) each."""
    procs = []
    for index, group in enumerate(groups):
        listing = binary.parent / f"handshake-devices-{index}.txt"
        listing.write_text("".join(f"{d.cert} {d.key} {d.device_id}-h\n" for d in group))
        procs.append(
            subprocess.Popen(
                [str(binary), str(port), str(seconds), str(listing)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"handshake load generator exited {proc.returncode}")
        done, failed, cpu = out.split()
        results.append((int(done), int(failed), float(cpu)))
    return results


def measure_handshakes(
    env: Env, target: Target, procs: int, concurrency: int, seconds: float
) -> tuple[float, float, int, float, float]:
    """Handshakes per second, load generator CPU share, failures, server CPU ms each, and
    the whole machine's CPU ms each (generator, server, upstream broker, PostgreSQL...)."""
    devices = list(env.devices)
    groups = [devices[i * concurrency : (i + 1) * concurrency] for i in range(procs)]
    machine = machine_busy_seconds()
    cpu = cpu_seconds(target.pids)
    if env.handshake_loadgen is not None:
        results = run_handshake_loadgen(env.handshake_loadgen, target.port, groups, seconds)
    else:
        args = [(env, target.port, group, seconds) for group in groups]
        results = run_procs(handshake_worker, args, seconds + 30)
    cpu = cpu_seconds(target.pids) - cpu
    machine = machine_busy_seconds() - machine
    done: int = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    loadgen_cpu = sum(r[2] for r in results)
    cores = os.cpu_count() or 1
    share = float(loadgen_cpu) / (seconds * cores)
    print(
        f"{target.name}: {done} handshakes in {seconds:.0f}s, server CPU {cpu:.2f}s "
        f"({1e3 * cpu / max(done, 1):.2f} ms each), load generator CPU {loadgen_cpu:.2f}s, "
        f"machine CPU {machine:.2f}s",
        flush=True,
    )
    each = 1e3 / max(done, 1)
    return done / seconds, share, failed, cpu * each, machine * each


def measure_messages(
    env: Env, target: Target, qos: int, pairs: int, seconds: float
) -> tuple[float, float]:
    """Delivered messages per second, and server CPU microseconds per delivered message."""
    args = [(env, target.port, env.devices[i], qos, seconds, 0.5) for i in range(pairs)]
    cpu = cpu_seconds(target.pids)
    results = run_procs(pair_worker, args, seconds + 60)
    cpu = cpu_seconds(target.pids) - cpu
    delivered = float(sum(r[0] for r in results))
    # The CPU covers the whole run (warm-up and tail too); the count only the window.
    return delivered / seconds, 1e6 * cpu / max(delivered, 1.0)


def measure_rtt(env: Env, target: Target, rounds: int) -> list[float]:
    (samples,) = run_procs(rtt_worker, [(env, target.port, env.devices[0], rounds)], 120)
    return list(samples)


def median2(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run with the median rate."""
    return sorted(runs)[len(runs) // 2]


def handshake_medians(
    runs: list[tuple[float, float, int, float, float]],
) -> tuple[float, float, int, float, float]:
    """Each column's own median (rate, load share, CPU per handshake); failures summed.

    The CPU per handshake of the median-rate run alone swings with whatever else ran then.
    """
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        sum(r[2] for r in runs),
        statistics.median(r[3] for r in runs),
        statistics.median(r[4] for r in runs),
    )


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    samples = sorted(samples)
    return statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99) - 1] * 1e3


def _pause(seconds: float, what: str, target: Target) -> None:
    """``--pause-held``: time to attach heaptrack or gdb to the server (bench/README.md)."""
    if seconds > 0:
        print(
            f"{target.name} {what}: pids {target.memory_pids}, pausing {seconds:.0f}s", flush=True
        )
        time.sleep(seconds)


def measure_memory(
    env: Env,
    target: Target,
    sessions: int,
    procs: int,
    extra: tuple[int, ...] = (),
    *,
    pause: float = 0.0,
) -> tuple[float, int, float]:
    device = env.devices[-1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    release = ctx.Event()
    procs = max(procs, -(-sessions // HOLD_PER_PROCESS))
    per = sessions // procs
    ids = [f"{device.device_id}-m{i}" for i in range(per * procs)]
    time.sleep(0.5)
    _pause(pause, "before holding", target)
    before = rss_kb(target.memory_pids)
    before_extra = rss_kb(extra) if extra else 0
    workers = [
        ctx.Process(
            target=hold_worker,
            args=(
                env,
                target.port,
                device,
                ids[i * per : (i + 1) * per],
                f"127.0.0.{2 + i}",
                queue,
                release,
            ),
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    held = failed = 0
    for _ in workers:
        h, f = queue.get(timeout=max(300.0, sessions / 20))  # a loaded machine: ~100/s
        held += h
        failed += f
    time.sleep(1.0)
    _pause(pause, f"holding {held}", target)
    after = rss_kb(target.memory_pids)
    after_extra = rss_kb(extra) if extra else 0
    release.set()
    for w in workers:
        w.join(30)
    time.sleep(1.0)
    per_session = (after - before) / max(held, 1)
    extra_per = (after_extra - before_extra) / max(held, 1)
    return per_session, held, extra_per


# --- main ------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway(
    work: Path,
    pki: Path,
    url: str,
    upstream: int,
    workers: int,
    *,
    name: str = "gateway",
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[Target, subprocess.Popen[bytes]]]:
    port = free_port()
    policy = work / "policy.toml"
    policy.write_text(f'[fleets.{FLEET}]\nclient_ids = ["{{device_id}}-*"]\n')
    env = {
        **os.environ,
        "DEVICEGATE_DATABASE_URL": url,
        "DEVICEGATE_PKI_DIR": str(pki),
        "DEVICEGATE_SPOOL_DIR": str(work / f"spool-{name}"),
        "DEVICEGATE_INSTANCE_ID": f"bench-{name}",
        "DEVICEGATE_POLICY_FILE": str(policy),
        "DEVICEGATE_MAX_CONNECTIONS": "100000",
        # The handshake load reconnects a few identities thousands of times a second: the
        # per-device connect budget (20 a minute) would refuse them, a fleet never would.
        "DEVICEGATE_DEVICE_CONNECTS_PER_MINUTE": "0",
        "DEVICEGATE_DRAIN_TIMEOUT": "5s",
        "DEVICEGATE_LOG_FORMAT": "text",
        # Any free port per worker (the default 9464 may be taken by a real deployment).
        "DEVICEGATE_METRICS_LISTEN": "127.0.0.1:0",
        **(extra_env or {}),
    }
    command = [
        str(Path(sys.executable).with_name("devicegate")), "serve", "gateway",
        "--workers", str(workers), "--listen", f"127.0.0.1:{port}",
        "--upstream", f"mqtt://127.0.0.1:{upstream}",
    ]  # fmt: skip
    log = (work / f"{name}.log").open("wb")
    process = subprocess.Popen(command, env=env, stderr=log)
    try:
        wait_for_port(port, 90.0)  # a loaded machine starts the workers slowly
        deadline = time.monotonic() + 20
        while len(children(process.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # --workers 1 runs in the command's own process.
        workers_ = children(process.pid)
        # CPU: the workers; RSS: the supervisor too (--workers 1 runs in the command's own
        # process).
        yield Target(name, port, workers_ or (process.pid,), (process.pid, *workers_)), process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def profiled(py_spy: str | None, target: Target, work: Path, label: str) -> Iterator[None]:
    """Sample the gateway workers with py-spy (collapsed stacks) while the block runs."""
    if py_spy is None:
        yield
        return
    outs = [work / f"profile-{label}-{pid}.txt" for pid in target.pids]
    procs = [
        subprocess.Popen(
            [py_spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, out in zip(target.pids, outs, strict=True)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    print_profile(label, outs)


def print_profile(label: str, outs: list[Path], top: int = 18) -> None:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for out in outs:
        if not out.exists():
            continue
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [re.sub(r"\(.*/", "(", re.sub(r":\d+\)", ")", f)) for f in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        print(f"profile {label}: no samples")
        return
    print(f"\nprofile {label}: {total} samples over the workers; top by own time")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(
            f"  {100 * n / total:5.1f}% own  {100 * inclusive[frame] / total:5.1f}% incl  {frame}"
        )


FIGURES = ("memory", "handshakes", "qos0", "qos1", "rtt")


def metrics_ports(log: Path) -> list[int]:
    """The /metrics ports the workers logged (``metrics on http://HOST:PORT/metrics``)."""
    return [int(p) for p in re.findall(r"metrics on http://[^:]+:(\d+)/metrics", log.read_text())]


def scrape_handshakes(ports: list[int]) -> int:
    """Admitted connections counted by every worker (proves telemetry was really on)."""
    import urllib.request

    total = 0
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            if line.startswith("devicegate_handshakes_total{") and 'reason="ok"' in line:
                total += int(float(line.rpartition(" ")[2]))
    return total


def telemetry_overhead(
    args: argparse.Namespace, work: Path, pki: Path, url: str, env: Env, seconds: float
) -> None:
    """QoS 0 throughput (and handshakes) through two identical gateways, one run.

    "on": the default configuration (Prometheus /metrics, connection spans sampled out).
    "off": ``OTEL_SDK_DISABLED=true`` and
    ``DEVICEGATE_METRICS_LISTEN=off`` (no-op meter and tracer; the per-connection hooks
    and the per-event log lines still run, as in production with telemetry off). Alternating
    runs, median of each side.
    """
    upstream_port = free_port()
    off_env = {"OTEL_SDK_DISABLED": "true", "DEVICEGATE_METRICS_LISTEN": "off"}
    with (
        mosquitto(work, upstream_port, None),
        gateway(work, pki, url, upstream_port, args.workers, name="telemetry-on") as (on, _),
        gateway(
            work, pki, url, upstream_port, args.workers, name="telemetry-off", extra_env=off_env
        ) as (off, _),
    ):
        ports = metrics_ports(work / "telemetry-on.log")
        assert len(ports) == args.workers, f"metrics ports logged: {ports}"
        assert not metrics_ports(work / "telemetry-off.log")
        q_on: list[tuple[float, float]] = []
        q_off: list[tuple[float, float]] = []
        h_on: list[tuple[float, float]] = []
        h_off: list[tuple[float, float]] = []
        for i in range(args.repeat):
            first, second = (on, off) if i % 2 == 0 else (off, on)
            for target in (first, second):
                rate = measure_messages(env, target, 0, args.pairs, seconds)
                (q_on if target is on else q_off).append(rate)
                print(f"qos0 {target.name}: {rate[0]:,.0f} msgs/s, {rate[1]:.1f} us CPU/msg",
                      flush=True)  # fmt: skip
        if "handshakes" in args.only.split(","):
            for i in range(args.repeat):
                first, second = (on, off) if i % 2 == 0 else (off, on)
                for target in (first, second):
                    got = measure_handshakes(env, target, args.procs, args.concurrency, seconds)
                    (h_on if target is on else h_off).append((got[0], got[3]))
        admitted = scrape_handshakes(ports)

    def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
        """The median rate and, on its own, the median CPU per operation."""
        return statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)

    (qr_on, qc_on), (qr_off, qc_off) = medians(q_on), medians(q_off)
    rows = [
        ("QoS 0 msgs/s delivered", f"{qr_off:,.0f}", f"{qr_on:,.0f}", fmt_ratio(qr_on, qr_off)),
        ("  server CPU us/msg", f"{qc_off:.1f}", f"{qc_on:.1f}", fmt_ratio(qc_on, qc_off)),
    ]
    if h_on:
        (hr_on, hc_on), (hr_off, hc_off) = medians(h_on), medians(h_off)
        rows += [
            ("handshakes/s", f"{hr_off:,.0f}", f"{hr_on:,.0f}", fmt_ratio(hr_on, hr_off)),
            ("  server CPU ms/handshake", f"{hc_off:.2f}", f"{hc_on:.2f}",
             fmt_ratio(hc_on, hc_off)),
        ]  # fmt: skip
    headers = ("figure", "telemetry off", "telemetry on", "on/off")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(4)]
    print()
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
    cost = 1 - qr_on / qr_off if qr_off else float("nan")
    cpu_cost = qc_on / qc_off - 1 if qc_off else float("nan")
    print(
        f"\ntelemetry costs {cost:+.1%} of QoS 0 throughput and {cpu_cost:+.1%} server CPU per"
        " message (target < 5%; on a shared machine trust the CPU figure more); runs on/off:"
        f" {[round(r) for r, _ in q_on]} / {[round(r) for r, _ in q_off]};"
        f" the on gateway's /metrics counted {admitted} admitted connections"
        f" (cpus: {os.cpu_count()}, {args.workers} workers each, {args.pairs} pairs,"
        f" window {seconds:.0f}s x {args.repeat}, load average {os.getloadavg()[0]:.1f})"
    )


def policy_statements_file(work: Path, count: int) -> Path:
    """A generated policy set of ``count`` statements (statement model, JSON), attached to
    the bench fleet, that allows what the bench does (client ids ``{device_id}-*``, its own
    topics) among Allow and Deny statements on other topics, a few with QoS conditions."""
    statements: list[dict[str, Any]] = [
        {"id": "connect", "effect": "Allow", "actions": ["connect"],
         "resources": ["{device_id}", "{device_id}-*"]},
        {"id": "own", "effect": "Allow", "actions": ["publish", "subscribe", "receive"],
         "resources": ["devices/{device_id}/#"]},
    ]  # fmt: skip
    kinds = [
        ("Allow", ["publish"], "devices/{device_id}/s%d/+/t", None),
        ("Deny", ["subscribe", "receive"], "devices/{device_id}/private%d/#", None),
        ("Allow", ["subscribe", "receive"], "fleets/{fleet}/r%d/+", None),
        ("Deny", ["publish"], "fleets/{fleet}/x%d/#", None),
        ("Allow", ["publish"], "telemetry/{fleet}/{device_id}/k%d", {"max_qos": 1}),
    ]
    for i in range(count - len(statements)):
        effect, actions, resource, conditions = kinds[i % len(kinds)]
        statement: dict[str, Any] = {
            "id": f"s{i}",
            "effect": effect,
            "actions": actions,
            "resources": [resource % i],
        }
        if conditions:
            statement["conditions"] = conditions
        statements.append(statement)
    document = {
        "policies": {"bench": {"statements": statements}},
        "attach": [{"policy": "bench", "fleet": FLEET}],
    }
    path = work / f"policy-{count}.json"
    path.write_text(json.dumps(document, indent=1))
    return path


def decision_ns(policy_file: Path | None, device: Device) -> tuple[float, float, float]:
    """Nanoseconds per PUBLISH decision in process: `CompiledPolicy.decide` on the bench
    topic (what a session's cache miss costs), and the session's own cached path (a
    `Session` fed PUBLISH frames to an allowed topic, fast path and all), and the session's
    path for deliveries to the device (judged when the policy has receive statements)."""
    from gateway.audit import EventContext
    from gateway.connection import Session
    from gateway.identity import DeviceIdentity
    from gateway.policy import Action, PolicySet, load_policy
    from gateway.policy_live import state_from_document
    from schemas.events import Reason

    identity = DeviceIdentity(device.device_id, FLEET, "1", "00")
    state = state_from_document(load_policy(policy_file))
    compiled = state.for_identity(identity, trust_domain=TRUST_DOMAIN)
    topic = f"devices/{device.device_id}/bench"
    n = 200_000
    started = time.perf_counter_ns()
    for _ in range(n):
        compiled.decide(Action.PUBLISH, topic)
    decide = (time.perf_counter_ns() - started) / n
    assert isinstance(state.policies, PolicySet)
    session = Session(
        identity=identity, policy=compiled, context=EventContext(instance="bench"),
        max_packet_size=65536,
    )  # fmt: skip
    session.receive_device(connect_frame(f"{device.device_id}-x"))
    session.device_checked(Reason.OK)
    session.receive_upstream(b"\x20\x02\x00\x00")
    session.admitted()
    batch = publish_frame(topic, PAYLOAD) * 100
    session.receive_device(batch)
    started = time.perf_counter_ns()
    for _ in range(n // 100):
        session.receive_device(batch)
    cached = (time.perf_counter_ns() - started) / n
    # Deliveries the other way, judged by the policy's receive statements (if any).
    started = time.perf_counter_ns()
    for _ in range(n // 100):
        session.receive_upstream(batch)
    delivered = (time.perf_counter_ns() - started) / n
    return decide, cached, delivered


def policy_comparison(
    args: argparse.Namespace, work: Path, pki: Path, url: str, env: Env, seconds: float
) -> None:
    """QoS 0 throughput and round-trip p50/p99 through two identical gateways, one with the
    default policy, one with a generated ``--policy-statements`` set; alternating runs,
    medians; CPU per message of each gateway's workers; decision cost in process."""
    upstream_port = free_port()
    generated = policy_statements_file(work, args.policy_statements)
    many_env = {"DEVICEGATE_POLICY_FILE": str(generated), "DEVICEGATE_POLICY_SOURCE": "file"}
    with (
        mosquitto(work, upstream_port, None),
        gateway(work, pki, url, upstream_port, args.workers, name="policy-default") as (base, _),
        gateway(
            work, pki, url, upstream_port, args.workers, name="policy-many", extra_env=many_env
        ) as (many, _),
    ):
        rates: dict[str, list[tuple[float, float]]] = {base.name: [], many.name: []}
        rtts: dict[str, list[float]] = {base.name: [], many.name: []}
        for i in range(args.repeat):
            for target in (base, many) if i % 2 == 0 else (many, base):
                rate = measure_messages(env, target, 0, args.pairs, seconds)
                rates[target.name].append(rate)
                rtts[target.name] += measure_rtt(env, target, args.rounds)
                print(f"qos0 {target.name}: {rate[0]:,.0f} msgs/s, {rate[1]:.1f} us CPU/msg",
                      flush=True)  # fmt: skip
    device = env.devices[0]
    default_file = work / "policy.toml"  # what `gateway` wrote for the default side
    ns = {base.name: decision_ns(default_file, device), many.name: decision_ns(generated, device)}
    print(
        f"\n{args.policy_statements}-statement policy vs the default (bench fleet), one run,"
        f" {args.workers} workers each, {args.pairs} pairs, {seconds:.0f} s x {args.repeat}:"
    )
    print("policy | QoS 0 msg/s | gateway CPU us/msg | RTT p50 / p99 ms | decide ns | "
          "session ns/PUBLISH (cached) | session ns/delivery")  # fmt: skip
    for target, label in ((base, "default"), (many, f"{args.policy_statements} statements")):
        runs = rates[target.name]
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        p50, p99 = percentiles(rtts[target.name])
        decide, cached, delivered = ns[target.name]
        print(
            f"{label} | {rate:,.0f} | {cpu:.1f} | {p50:.3f} / {p99:.3f} |"
            f" {decide:,.0f} | {cached:,.0f} | {delivered:,.0f}"
        )


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base and value == value and base == base else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="10,000 sessions, longer windows")
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="each throughput window")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--concurrency", type=int, default=16, help="loops per load process")
    parser.add_argument("--pairs", type=int, default=4, help="publisher/subscriber pairs")
    parser.add_argument("--rounds", type=int, default=1000, help="round trips per latency run")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per figure")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--loadgen",
        choices=("c", "python"),
        default="c",
        help="handshake load generator: bench/loadgen/handshake.c (compiled here; falls back "
        "to the Python one if it cannot be) or the Python `handshake_worker`",
    )
    parser.add_argument("--py-spy", default=None, help="py-spy binary: profile the workers")
    parser.add_argument(
        "--pause-held",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="memory: pause this long before and while the sessions are held, printing the "
        "server's pids (to attach heaptrack or gdb; see bench/README.md)",
    )
    parser.add_argument(
        "--only", default=",".join(FIGURES), help=f"comma-separated subset of {FIGURES}"
    )
    parser.add_argument(
        "--telemetry-overhead",
        action="store_true",
        help="instead: QoS 0 (and, with handshakes in --only, handshake) rates through a "
        "gateway with telemetry on vs off, in the same run; prints the ratio",
    )
    parser.add_argument(
        "--policy-statements",
        type=int,
        default=0,
        metavar="N",
        help="instead: QoS 0 throughput and RTT p99 with the default policy and a generated "
        "N-statement one, in the same run, with the decision cost in ns",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    sessions = args.sessions or (10_000 if args.full else 2_000)
    seconds = args.seconds or (8.0 if args.full else 3.0)
    _raise_fd_limit()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto not installed")
    if "memory" in only and not args.telemetry_overhead:
        # Mosquitto holds every session in one process (one fd each), and so does the
        # upstream broker; a gateway worker holds two per session (device + broker).
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        need = max(sessions, 2 * sessions // args.workers) + 256
        if limit != resource.RLIM_INFINITY and need > limit:
            sys.exit(
                f"--sessions {sessions} needs RLIMIT_NOFILE >= {need} (one process holds "
                f"them all); the hard limit here is {limit}: raise it (ulimit -Hn, "
                "CAP_SYS_RESOURCE) or hold fewer sessions"
            )

    work = Path(tempfile.mkdtemp(prefix="devicegate-bench-"))
    pki = work / "pki"
    init_pki(pki, passphrase=PASSPHRASE, force=True)
    (work / "devices").mkdir()
    count = max(args.procs * args.concurrency, args.pairs) + 1
    devices = make_devices(pki, work / "devices", count)
    loadgen = build_handshake_loadgen(work) if args.loadgen == "c" else None
    env = Env(str(pki / "chain.pem"), tuple(d for d, _ in devices), loadgen)
    db_name = f"dg_bench_{secrets.token_hex(4)}"
    url = asyncio.run(create_database(db_name, devices))
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        if args.telemetry_overhead:
            telemetry_overhead(args, work, pki, url, env, seconds)
            return
        if args.policy_statements:
            policy_comparison(args, work, pki, url, env, seconds)
            return
        direct_port, upstream_port = free_port(), free_port()
        with (
            mosquitto(work, direct_port, pki) as direct_proc,
            mosquitto(work, upstream_port, None) as upstream_proc,
            gateway(work, pki, url, upstream_port, args.workers) as (gw, _),
        ):
            direct = Target("mosquitto", direct_port, (direct_proc.pid,))
            generator = "C" if env.handshake_loadgen else "Python"
            print(f"gateway workers: pids {gw.pids}; load: {args.procs} procs "
                  f"({generator} handshake generator)", flush=True)  # fmt: skip

            nan = float("nan")
            mem_m = mem_g = mem_up = hs_m = hs_g = share_m = share_g = nan
            q0_m = q0_g = q1_m = q1_g = p50_m = p50_g = p99_m = p99_g = nan
            hcpu_m = hcpu_g = mcpu_m = mcpu_g = q0cpu_m = q0cpu_g = q1cpu_m = q1cpu_g = nan
            fail_m = fail_g = 0
            if "memory" in only:
                mem_m, held_m, _ = measure_memory(
                    env, direct, sessions, args.procs, pause=args.pause_held
                )
                mem_g, held_g, mem_up = measure_memory(
                    env, gw, sessions, args.procs, extra=(upstream_proc.pid,), pause=args.pause_held
                )
                print(f"memory: held {held_m} (mosquitto) / {held_g} (gateway)", flush=True)
            # Alternating rounds (mosquitto, gateway, mosquitto, ...), median of each side:
            # on a shared machine the load of others moves every figure.
            rounds = range(args.repeat)
            if "handshakes" in only:
                hs_ms, hs_gs = [], []
                for i in rounds:
                    hs_ms.append(
                        measure_handshakes(env, direct, args.procs, args.concurrency, seconds)
                    )
                    with profiled(args.py_spy if i == 0 else None, gw, work, "handshakes"):
                        hs_gs.append(
                            measure_handshakes(env, gw, args.procs, args.concurrency, seconds)
                        )
                hs_m, share_m, fail_m, hcpu_m, mcpu_m = handshake_medians(hs_ms)
                hs_g, share_g, fail_g, hcpu_g, mcpu_g = handshake_medians(hs_gs)
            if "qos0" in only:
                q0_ms, q0_gs = [], []
                for i in rounds:
                    q0_ms.append(measure_messages(env, direct, 0, args.pairs, seconds))
                    with profiled(args.py_spy if i == 0 else None, gw, work, "qos0"):
                        q0_gs.append(measure_messages(env, gw, 0, args.pairs, seconds))
                (q0_m, q0cpu_m), (q0_g, q0cpu_g) = median2(q0_ms), median2(q0_gs)
            if "qos1" in only:
                q1_ms, q1_gs = [], []
                for _ in rounds:
                    q1_ms.append(measure_messages(env, direct, 1, args.pairs, seconds))
                    q1_gs.append(measure_messages(env, gw, 1, args.pairs, seconds))
                (q1_m, q1cpu_m), (q1_g, q1cpu_g) = median2(q1_ms), median2(q1_gs)
            if "rtt" in only:
                rtt_m: list[float] = []
                rtt_g: list[float] = []
                for i in rounds:
                    rtt_m += measure_rtt(env, direct, args.rounds)
                    with profiled(args.py_spy if i == 0 else None, gw, work, "rtt"):
                        rtt_g += measure_rtt(env, gw, args.rounds)
                p50_m, p99_m = percentiles(rtt_m)
                p50_g, p99_g = percentiles(rtt_g)

        rows = [
            ("handshakes/s (TLS+CONNECT)", f"{hs_m:,.0f}", f"{hs_g:,.0f}",
             fmt_ratio(hs_g, hs_m), ">= 1.0x"),
            ("  server CPU ms/handshake", f"{hcpu_m:.2f}", f"{hcpu_g:.2f}",
             fmt_ratio(hcpu_g, hcpu_m), ""),
            ("  machine CPU ms/handshake", f"{mcpu_m:.2f}", f"{mcpu_g:.2f}",
             fmt_ratio(mcpu_g, mcpu_m), "(all processes)"),
            ("  load generator CPU share", f"{share_m:.0%}", f"{share_g:.0%}", "", ""),
            ("  failed attempts (all runs)", f"{fail_m}", f"{fail_g}", "", ""),
            ("QoS 0 msgs/s delivered", f"{q0_m:,.0f}", f"{q0_g:,.0f}",
             fmt_ratio(q0_g, q0_m), ">= 0.6x"),
            ("  server CPU us/msg", f"{q0cpu_m:.1f}", f"{q0cpu_g:.1f}",
             fmt_ratio(q0cpu_g, q0cpu_m), "(gateway only)"),
            ("QoS 1 msgs/s delivered", f"{q1_m:,.0f}", f"{q1_g:,.0f}",
             fmt_ratio(q1_g, q1_m), ""),
            ("  server CPU us/msg", f"{q1cpu_m:.1f}", f"{q1cpu_g:.1f}",
             fmt_ratio(q1cpu_g, q1cpu_m), "(gateway only)"),
            ("round trip p50 (ms)", f"{p50_m:.3f}", f"{p50_g:.3f}",
             f"+{p50_g - p50_m:.3f} ms", ""),
            ("round trip p99 (ms)", f"{p99_m:.3f}", f"{p99_g:.3f}",
             f"+{p99_g - p99_m:.3f} ms", "<= +0.3 ms"),
            (f"KB per held session (N={sessions})", f"{mem_m:.1f}", f"{mem_g:.1f}",
             fmt_ratio(mem_g, mem_m), "<= 1.5x"),
            ("  + upstream broker KB/session", "", f"{mem_up:.1f}", "", "(not counted)"),
        ]  # fmt: skip
        rows = [row for row in rows if "nan" not in row[2]]  # figures left out by --only
        headers = ("figure", "mosquitto mTLS", f"gateway x{args.workers}", "ratio", "target")
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(5)]
        print()
        for row in [headers, *rows]:
            print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        load = os.getloadavg()[0]
        print(
            f"\n(cpus: {os.cpu_count()}, window {seconds:.0f}s x {args.repeat} alternating runs,"
            f" medians; {args.pairs} pairs; load average at the end {load:.1f})"
        )
    finally:
        asyncio.run(drop_database(db_name))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory: {work}")


if __name__ == "__main__":
    main()
