"""Benchmark: scale-out over 1, 2 and 3 gateway instances on this machine, and the
revocation-to-disconnect latency across instances.

Each instance is ``devicegate serve gateway --workers 1`` (its own instance id, spool,
metrics port), so on a small machine the instances share its cores honestly: adding
instances adds event loops, not cores. All share one Mosquitto and one PostgreSQL (a
scratch database). The load generator spreads its connections over the instances' ports
itself (client-side round robin, no HAProxy: HAProxy's own CPU would blur the figure;
its PROXY v2 path is covered by the tests).

- ``handshakes/s``: TLS 1.3 with an EC P-256 device certificate + CONNECT + CONNACK (each
  admission waits for its durable ``connect`` event and announces the session on
  ``devicegate_sessions``) + DISCONNECT, from ``--procs`` load processes.
- ``qos0 msg/s``: ``--pairs`` publisher/subscriber pairs (pair i on instance i mod N),
  counted at the subscribers in a steady window.
- the load generator's share of the machine's CPU is printed beside each figure, and the
  gateways' own CPU per operation (steadier than rates when the machine is shared).
- each instance count runs ``--repeat`` times (order alternating: 1,2,3,3,2,1); medians.
- revocation latency: ``--revocations`` devices connected over the three instances, each
  revoked in turn with provisioning's own `provisioning.admin.revoke_device` (its
  transaction, event and NOTIFY); latency = from the call to the device's socket closing
  (p50/p99; target p99 <= 200 ms).

Usage: .venv/bin/python bench/scaleout.py [--seconds S] [--revocations N]
       (PostgreSQL from DEVICEGATE_BENCH_ADMIN_URL, default postgres@127.0.0.1/postgres)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import resource
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("bench_gateway", ROOT / "bench" / "mqtt_gateway.py")
assert _spec is not None and _spec.loader is not None
bg: Any = importlib.util.module_from_spec(_spec)
sys.modules["bench_gateway"] = bg
_spec.loader.exec_module(bg)

from provisioning import admin  # noqa: E402
from provisioning.pki.directory import init_pki  # noqa: E402


@dataclass
class Instance:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    def pids(self) -> tuple[int, ...]:
        return (self.process.pid, *bg.children(self.process.pid))


@contextlib.contextmanager
def instances(
    count: int, work: Path, pki: Path, url: str, upstream: int
) -> Iterator[list[Instance]]:
    started: list[Instance] = []
    policy = work / "policy.toml"
    policy.write_text(f'[fleets.{bg.FLEET}]\nclient_ids = ["{{device_id}}", "{{device_id}}-*"]\n')
    try:
        for i in range(count):
            name = f"scale-gw{i}"
            port = bg.free_port()
            env = {
                **os.environ,
                "DEVICEGATE_DATABASE_URL": url,
                "DEVICEGATE_PKI_DIR": str(pki),
                "DEVICEGATE_SPOOL_DIR": str(work / name / "spool"),
                "DEVICEGATE_INSTANCE_ID": name,
                "DEVICEGATE_POLICY_FILE": str(policy),
                "DEVICEGATE_METRICS_LISTEN": f"127.0.0.1:{bg.free_port()}",
                "DEVICEGATE_MAX_CONNECTIONS": "100000",
                # The handshake load reconnects a few identities thousands of times a second: the
                # per-device connect budget (20 a minute) would refuse them, a fleet never would.
                "DEVICEGATE_DEVICE_CONNECTS_PER_MINUTE": "0",
                "DEVICEGATE_DRAIN_TIMEOUT": "3s",
                "DEVICEGATE_LOG_FORMAT": "text",
            }
            command = [
                str(Path(sys.executable).with_name("devicegate")), "serve", "gateway",
                "--workers", "1", "--listen", f"127.0.0.1:{port}",
                "--upstream", f"mqtt://127.0.0.1:{upstream}",
            ]  # fmt: skip
            (work / name).mkdir(exist_ok=True)
            with (work / name / "gateway.log").open("wb") as log:
                process = subprocess.Popen(command, env=env, stderr=log, start_new_session=True)
            started.append(Instance(name, port, process))
        for instance in started:
            bg.wait_for_port(instance.port, 30)
        time.sleep(0.5)
        yield started
    finally:
        for instance in started:
            instance.process.send_signal(signal.SIGTERM)
        for instance in started:
            try:
                instance.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(instance.process.pid, signal.SIGKILL)
                instance.process.wait()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu(group: list[Instance]) -> float:
    return float(sum(bg.cpu_seconds(i.pids()) for i in group))


def handshakes(
    env: Any, group: list[Instance], procs: int, concurrency: int, seconds: float
) -> tuple[float, float, float, int]:
    """(handshakes/s, load generator share of the machine, gateway CPU ms each, failures)."""
    devices = list(env.devices)
    args = [
        (
            env,
            group[i % len(group)].port,
            devices[i * concurrency : (i + 1) * concurrency],
            seconds,
        )
        for i in range(procs)
    ]
    cpu, gen = _cpu(group), _children_cpu()
    results = bg.run_procs(bg.handshake_worker, args, seconds + 30)
    cpu, gen = _cpu(group) - cpu, _children_cpu() - gen
    cores = os.cpu_count() or 1
    done = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    return done / seconds, gen / (seconds * cores), 1e3 * cpu / max(done, 1), failed


def messages(
    env: Any, group: list[Instance], pairs: int, seconds: float
) -> tuple[float, float, float]:
    """(QoS 0 messages/s delivered, load generator share, gateway CPU us per message)."""
    warmup = 0.5
    args = [
        (env, group[i % len(group)].port, env.devices[-1 - i], 0, seconds, warmup)
        for i in range(pairs)
    ]
    cpu, gen = _cpu(group), _children_cpu()
    start = time.monotonic()
    results = bg.run_procs(bg.pair_worker, args, seconds + 60)
    wall = time.monotonic() - start
    cpu, gen = _cpu(group) - cpu, _children_cpu() - gen
    cores = os.cpu_count() or 1
    delivered = float(sum(r[0] for r in results))
    # The gateway CPU covers the whole run (warm-up and tail too), the count the window.
    return delivered / seconds, gen / (wall * cores), 1e6 * cpu / max(delivered, 1.0)


class Watch(asyncio.Protocol):
    """An MQTT 3.1.1 session that notes when the gateway closes it."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[bytes] = loop.create_future()
        self.closed_at: asyncio.Future[float] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 4 and not self.connack.done():
            self.connack.set_result(self.buf[:4])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed_at.done():
            self.closed_at.set_result(time.perf_counter())
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed"))


async def revocation_latency(
    env: Any, group: list[Instance], url: str, devices: list[Any], gap: float
) -> tuple[list[float], dict[str, int]]:
    """Seconds from each revoke call to the socket's close; revocations per instance."""
    loop = asyncio.get_running_loop()
    sessions: list[tuple[Any, Watch, str]] = []
    for i, device in enumerate(devices):
        instance = group[i % len(group)]
        context = bg.client_context(env, device)
        _, watch = await loop.create_connection(
            Watch, "127.0.0.1", instance.port, ssl=context, server_hostname="localhost"
        )
        assert watch.transport is not None
        watch.transport.write(bg.connect_frame(device.device_id))
        connack = await asyncio.wait_for(watch.connack, 10)
        assert connack[3] == 0, connack
        sessions.append((device, watch, instance.name))
    await asyncio.sleep(0.5)
    samples: list[float] = []
    per_instance: dict[str, int] = {}
    conn = await asyncpg.connect(url)
    try:
        for device, watch, name in sessions:
            start = time.perf_counter()
            await admin.revoke_device(conn, device.device_id, actor="bench", instance="bench")
            closed = await asyncio.wait_for(watch.closed_at, 5)
            samples.append(closed - start)
            per_instance[name] = per_instance.get(name, 0) + 1
            await asyncio.sleep(gap)
    finally:
        await conn.close()
    return samples, per_instance


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="each throughput window")
    parser.add_argument("--procs", type=int, default=3, help="handshake load processes")
    parser.add_argument("--concurrency", type=int, default=8, help="loops per load process")
    parser.add_argument("--pairs", type=int, default=3, help="publisher/subscriber pairs")
    parser.add_argument("--revocations", type=int, default=120)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between revocations")
    parser.add_argument("--max-instances", type=int, default=3)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per instance count (order alternates)"
    )
    args = parser.parse_args()
    bg._raise_fd_limit()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto not installed")
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="devicegate-scaleout-"))
    pki = work / "pki"
    init_pki(pki, passphrase=bg.PASSPHRASE, force=True)
    (work / "devices").mkdir()
    load = args.procs * args.concurrency
    made = bg.make_devices(pki, work / "devices", load + args.pairs + args.revocations)
    devices = [d for d, _ in made]
    env = bg.Env(str(pki / "chain.pem"), tuple(devices[:load] + devices[-args.pairs :]))
    doomed = devices[load : load + args.revocations]
    db_name = f"dg_bench_{secrets.token_hex(4)}"
    url = asyncio.run(bg.create_database(db_name, made))
    upstream = bg.free_port()
    rows: list[tuple[int, float, float, float, float, float, float, int]] = []
    latency: list[float] = []
    spread: dict[str, int] = {}
    try:
        with bg.mosquitto(work, upstream, None):
            order = [
                count
                for run in range(args.repeat)
                for count in (
                    range(1, args.max_instances + 1)
                    if run % 2 == 0
                    else range(args.max_instances, 0, -1)
                )
            ]
            for count in order:
                with instances(count, work, pki, url, upstream) as group:
                    h, h_gen, h_gw, failed = handshakes(
                        env, group, args.procs, args.concurrency, args.seconds
                    )
                    m, m_gen, m_gw = messages(env, group, args.pairs, args.seconds)
                    print(
                        f"{count} instance(s): {h:,.0f} handshakes/s (failed {failed}),"
                        f" {m:,.0f} QoS 0 msg/s",
                        flush=True,
                    )
                    rows.append((count, h, h_gen, h_gw, m, m_gen, m_gw, failed))
                    if count == args.max_instances and not latency:
                        latency, spread = uvloop.run(
                            revocation_latency(env, group, url, doomed, args.gap)
                        )
    finally:
        asyncio.run(bg.drop_database(db_name))
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, Python"
        f" {platform.python_version()}, {ssl.OPENSSL_VERSION}; each instance --workers 1;"
        f" {args.procs}x{args.concurrency} handshake loops, {args.pairs} QoS 0 pairs,"
        f" {args.seconds:.0f} s windows, median of {args.repeat} runs each"
    )
    header = (
        "instances",
        "handshakes/s",
        "loadgen CPU",
        "gateway CPU ms/handshake",
        "QoS 0 msg/s",
        "loadgen CPU",
        "gateway CPU us/msg",
    )
    print(" | ".join(header))
    for count in range(1, args.max_instances + 1):
        runs = [row for row in rows if row[0] == count]
        h, h_gen, h_gw, m, m_gen, m_gw = (
            statistics.median(row[k] for row in runs) for k in range(1, 7)
        )
        print(
            f"{count} | {h:,.0f} | {h_gen:.0%} | {h_gw:.2f} | {m:,.0f} | {m_gen:.0%} | {m_gw:.1f}"
            f"  (runs: {', '.join(f'{r[1]:,.0f} hs/s {r[4]:,.0f} msg/s' for r in runs)})"
        )
    if latency:
        ms = [1e3 * s for s in latency]
        p99 = pct(ms, 0.99)
        print(
            f"revocation -> disconnect over {len(ms)} revocations ({spread}):"
            f" p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {max(ms):.1f} ms"
            f" (target p99 <= 200 ms: {'met' if p99 <= 200 else 'NOT met'})"
        )
    print(
        f"(loadgen CPU: the load generator's share of the whole machine; load average"
        f" {os.getloadavg()[0]:.1f}; run took {time.monotonic() - began:.0f} s)"
    )


if __name__ == "__main__":
    main()
