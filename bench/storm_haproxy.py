"""``bench/storm.py``'s HAProxy phase: one of two instances restarts; the other's view.

Two gateway instances, A and B (``serve gateway --workers 2`` each: distinct instance ids,
the same database, the same ticket key file so a ticket from one resumes on the other, each
its own spool and checkpoint directories and ports), behind one HAProxy in TCP mode as
deploy/haproxy/haproxy.cfg runs it: ``leastconn``, PROXY v2 to the gateways, TCP health
checks (every 1 s, down after 3 failures, up after 2 successes; a server marked down keeps
its sessions: see docs/deployment.md), ``retries`` with ``redispatch`` so a connection
refused by a draining instance goes to the other. One upstream Mosquitto behind both.

The N devices connect through HAProxy's frontend. ``--uncut`` more sessions (100 by
default, their own certificates) are held on B and measure MQTT round trips continuously
(``bench/_uncut.py``). They come in through a second frontend of the same HAProxy whose
backend is B alone (tracking B's health in the main backend): every run puts all of them
on B, and their round trip still crosses the same HAProxy process as the storm. (Through
the main frontend, leastconn would put about half on A; those would be cut, and we would
need the gateway's events to learn which ones to keep.)

After a baseline window, A gets SIGTERM (drain) and is started again on the same port
(cold, like the other phases). Its devices reconnect through HAProxy, mostly to B while A
is down. Printed: the storm figures of the other phases (for A's devices), CPU per
reconnect of each process (A's old process while it drains, the new A, B, HAProxy, the
upstream Mosquitto) beside their CPU rate, and the uncut sessions' round-trip p50/p99 in
the baseline window and during the storm (SIGTERM until every device is back), how many
of them were cut (must be 0) and how many messages were lost (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _uncut import Uncut, UncutReport, window
from mqtt_gateway import cpu_seconds, free_port, wait_for_port
from reconnect import Fleet, Member, Report, percentile
from storm import (
    Phase,
    Server,
    Setup,
    _events,
    gateway_server,
    make_members,
    mosquitto_server,
    register,
    setup,
    startup_cpu,
)

HAPROXY = shutil.which("haproxy")
UNCUT_SOURCE = "127.0.1.{}"  # the uncut sessions' loopback sources, apart from the devices'


def haproxy_config(front: int, uncut_front: int, a: int, b: int, stats: Path, maxconn: int) -> str:
    checks = "send-proxy-v2 check check-send-proxy inter 1s fall 3 rise 2"
    return f"""
global
    maxconn {maxconn}
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 2s
    timeout check 2s
    timeout client 1h
    timeout server 1h
    timeout client-fin 30s
    timeout server-fin 30s
    retries 3
    option redispatch 1
frontend fe_mqtt
    bind 127.0.0.1:{front}
    default_backend be_gateways
frontend fe_uncut
    bind 127.0.0.1:{uncut_front}
    default_backend be_b
backend be_gateways
    balance leastconn
    default-server {checks}
    server A 127.0.0.1:{a}
    server B 127.0.0.1:{b}
backend be_b
    server B 127.0.0.1:{b} send-proxy-v2 track be_gateways/B
"""


def server_stats(stats: Path) -> dict[str, tuple[str, int]]:
    """HAProxy's ``be_gateways`` servers: name -> (status, current sessions)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out: dict[str, tuple[str, int]] = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "be_gateways" and row.get("svname") not in ("BACKEND", None):
            out[row["svname"]] = (row["status"], int(row["scur"] or 0))
    return out


def maxconn(devices: int, uncut: int) -> int:
    return devices + uncut + 50


def device_limit(devices: int, uncut: int) -> int:
    """How many of ``devices`` HAProxy can proxy beside ``uncut`` under the file-descriptor
    hard limit: it asks for two per connection of ``maxconn`` and a few dozen more
    (listeners, checks, the stats socket), and refuses to start if it cannot have them."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return devices
    return max(0, min(devices, (hard - 64) // 2 - maxconn(0, uncut)))


def unavailable(devices: int, uncut: int) -> str | None:
    """Why the phase cannot run here (one line), or None."""
    if HAPROXY is None:
        return "haproxy not installed (scripts/ensure-services.sh installs it): phase skipped"
    if device_limit(devices, uncut) < 10:
        return "the file-descriptor hard limit leaves HAProxy no room: phase skipped"
    return None


@dataclass
class Cpu:
    """One process's CPU: its rate (cores) in the baseline and the storm, and seconds spent
    in the storm window (per reconnect when divided)."""

    baseline_cores: float | None
    storm_seconds: float
    storm_wall: float


@dataclass
class HAProxyPhase:
    phase: Phase  # the figures of the other phases, for A's devices (printed with them)
    uncut_sessions: int
    on_a: int  # devices on A when it got SIGTERM (HAProxy's count)
    on_b: int
    after: dict[str, int]  # devices per instance once all were back
    landed: dict[str, int]  # allowed connect events per instance since SIGTERM
    cpu: dict[str, Cpu] = field(default_factory=dict)
    baseline: tuple[float, float] = (0.0, 0.0)  # time.time() window
    storm: tuple[float, float] = (0.0, 0.0)
    uncut: UncutReport = field(default_factory=UncutReport)


def _uncut_members(s: Setup, count: int) -> list[Member]:
    """``count`` more devices, registered, connecting from their own loopback sources."""
    out = s.work / "uncut"
    out.mkdir(exist_ok=True)
    pairs = make_members(s.pki, out, count, 1, prefix="uncut")
    asyncio.run(_register(s.url, [row for _, row in pairs]))  # type: ignore[misc]
    return [
        Member(m.cert, m.key, m.client_id, UNCUT_SOURCE.format(2 + i % 8))
        for i, (m, _row) in enumerate(pairs)
    ]


async def _register(url: str, rows: list[tuple[object, ...]]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await register(conn, rows)
    finally:
        await conn.close()


def _wait_back(fleet: Fleet, cut: int, timeout: float) -> Report:
    """Poll until every device holds a session and at least ``cut`` have reconnected."""
    deadline = time.monotonic() + timeout
    while True:
        report = fleet.report()
        if report.held == fleet.size and report.connects >= cut:
            return report
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{report.held} of {fleet.size} devices held, {report.connects} of {cut}"
                f" cut back after {timeout:.0f}s"
            )
        time.sleep(0.2)


def haproxy_phase(
    args: argparse.Namespace, s: Setup, upstream: Server, fleet: Fleet
) -> HAProxyPhase:
    """Run the phase on the devices of ``fleet`` (none held on entry); see the module doc.

    Only as many of them as HAProxy's file descriptors allow (a fleet of the first ones)."""
    assert HAPROXY is not None
    limit = device_limit(fleet.size, args.uncut)
    if limit < fleet.size:
        print(
            f"haproxy: {limit:,} of the {fleet.size:,} devices (two file descriptors per"
            " proxied session, under the hard limit)",
            flush=True,
        )
        part = Fleet(s.members[:limit], procs=args.procs)
        try:
            return haproxy_phase(args, s, upstream, part)
        finally:
            part.close()
    extra = {"DEVICEGATE_PROXY_PROTOCOL_FROM": "127.0.0.1/32"}
    a = gateway_server(
        s.work, s.pki, s.url, upstream.port, args.workers, name="A",
        extra={**extra, "DEVICEGATE_CHECKPOINT_DIR": str(s.work / "checkpoints-A")},
    )  # fmt: skip
    b = gateway_server(
        s.work, s.pki, s.url, upstream.port, args.workers, name="B",
        extra={**extra, "DEVICEGATE_CHECKPOINT_DIR": str(s.work / "checkpoints-B")},
    )  # fmt: skip
    front, uncut_front, stats = free_port(), free_port(), s.work / "haproxy.sock"
    config = s.work / "haproxy.cfg"
    conns = maxconn(fleet.size, args.uncut)
    config.write_text(haproxy_config(front, uncut_front, a.port, b.port, stats, conns))
    haproxy = Server(
        "haproxy",
        front,
        [HAPROXY, "-db", "-f", str(config)],
        dict(os.environ),
        s.work / "haproxy.log",
    )
    uncut: Uncut | None = None
    members = _uncut_members(s, args.uncut)
    try:
        a.start()
        b.start()
        a_startup = startup_cpu(a)
        haproxy.start()
        deadline = time.monotonic() + 10
        while any(st != "UP" for st, _ in server_stats(stats).values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy's servers not up: {server_stats(stats)}")
            time.sleep(0.1)
        wait_for_port(uncut_front)
        uncut = Uncut(members, uncut_front, interval=args.rtt_interval)
        uncut.start()
        fleet.connect(front, resume=True, base=args.base, cap=args.cap)
        took = fleet.wait_held(fleet.size, args.timeout)
        print(
            f"haproxy: {fleet.size:,} sessions held after {took:.1f}s, {args.uncut} uncut on B",
            flush=True,
        )
        time.sleep(1.0)  # the last CONNECTs' events and upstream subscriptions settle
        return _storm(args, fleet, a, b, haproxy, upstream, uncut, stats, a_startup, s.url)
    finally:
        if uncut is not None:
            uncut.close()
        fleet.ask("drop")
        for server in (haproxy, a, b):
            if server.process is not None and server.process.poll() is None:
                server.stop()


def _storm(
    args: argparse.Namespace,
    fleet: Fleet,
    a: Server,
    b: Server,
    haproxy: Server,
    upstream: Server,
    uncut: Uncut,
    stats: Path,
    a_startup: float,
    url: str,
) -> HAProxyPhase:
    others = {"B": b, "HAProxy": haproxy, "upstream Mosquitto": upstream}
    # Baseline: every session held, the uncut ones measuring.
    base_begin = time.time()
    marks = {name: cpu_seconds(server.pids()) for name, server in others.items()}
    marks["A"] = cpu_seconds(a.pids())
    time.sleep(args.baseline)
    base_end = time.time()
    wall = base_end - base_begin
    cores = {name: (cpu_seconds(srv.pids()) - marks[name]) / wall for name, srv in others.items()}
    cores["A"] = (cpu_seconds(a.pids()) - marks["A"]) / wall
    servers = server_stats(stats)
    on_a, on_b = servers["A"][1], servers["B"][1]
    # The storm: A drains and exits, and starts again on its port.
    fleet.send("reset")
    since = datetime.now(UTC)
    begun = time.time()
    marks = {name: cpu_seconds(server.pids()) for name, server in others.items()}
    a_old = cpu_seconds(a.pids())
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    drain = a.stop()
    gone = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The old A's whole life is in RUSAGE_CHILDREN once reaped (supervisor and workers).
    a_drain = gone.ru_utime + gone.ru_stime - reaped.ru_utime - reaped.ru_stime - a_old
    stopped = time.monotonic()
    a.start()
    gap = time.monotonic() - stopped
    a_listening = time.time()
    a_new = cpu_seconds(a.pids())
    report = _wait_back(fleet, on_a, args.timeout)
    ended = time.time()
    storm_cpu = {name: cpu_seconds(srv.pids()) - marks[name] for name, srv in others.items()}
    a_new = cpu_seconds(a.pids()) - a_new
    all_back = report.last_back - begun
    events, refusals = 0, Counter[str]()
    deadline = time.monotonic() + 30  # shipping: group commit, then COPY in batches
    while True:
        counted = [asyncio.run(_events(url, f"storm-{n}", since)) for n in ("A", "B")]
        events = sum(c[0] for c in counted)
        refusals = counted[0][1] + counted[1][1]
        if events >= report.connects or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(1.0)  # the storm window's last messages come back before the count
    final = uncut.finish()
    after = {name: n for name, (_st, n) in server_stats(stats).items()}
    storm_wall = max(ended - begun, 1e-3)
    phase = Phase(
        "A restarted behind HAProxy (resume offered)",
        fleet.size,
        all_back,
        drain,
        report,
        a_new + storm_cpu["B"],
        a_startup,
        gap,
        refusals,
        events,
    )
    cpu = {
        "A, old (SIGTERM -> exited)": Cpu(cores["A"], a_drain, drain),
        "A, new (listening -> all back)": Cpu(None, a_new, max(ended - a_listening, 1e-3)),
        **{name: Cpu(cores[name], storm_cpu[name], storm_wall) for name in others},
        "load generator (devices)": Cpu(None, report.cpu, storm_wall),
    }
    return HAProxyPhase(
        phase,
        final.sessions,
        on_a,
        on_b,
        after,
        {"A": counted[0][0], "B": counted[1][0]},
        cpu,
        (base_begin, base_end),
        (begun, begun + all_back),
        final,
    )


def print_haproxy(hp: HAProxyPhase) -> None:
    def ms(x: float) -> str:
        return f"{1e3 * x:.1f} ms"

    reconnects = max(hp.phase.report.connects, 1)
    storm_wall = hp.storm[1] - hp.storm[0]
    print(
        f"HAProxy phase: {hp.on_a:,} devices on A and {hp.on_b:,} on B when A got SIGTERM;"
        f" {hp.phase.report.connects:,} reconnects in {storm_wall:.2f} s"
        f" ({hp.phase.report.connects / max(storm_wall, 1e-3):.0f}/s), admitted by"
        f" {', '.join(f'{k} {v:,}' for k, v in hp.landed.items())} (connect events);"
        f" devices held once all were back: {', '.join(f'{k} {v:,}' for k, v in hp.after.items())}"
    )
    print()
    print("| process | CPU rate, baseline | CPU rate, storm | CPU per reconnect |")
    print("|---|---|---|---|")
    for name, c in hp.cpu.items():
        base = f"{c.baseline_cores:.2f} cores" if c.baseline_cores is not None else "-"
        print(
            f"| {name} | {base} | {c.storm_seconds / c.storm_wall:.2f} cores"
            f" | {ms(c.storm_seconds / reconnects)} |"
        )
    u = hp.uncut
    before = window(u, *hp.baseline)
    during = window(u, *hp.storm)
    print()
    print(
        f"| uncut sessions on B ({hp.uncut_sessions}) | baseline"
        f" ({hp.baseline[1] - hp.baseline[0]:.1f} s before SIGTERM)"
        f" | storm (SIGTERM -> all back, {storm_wall:.1f} s) |"
    )
    print("|---|---|---|")
    print(f"| round trips | {len(before):,} | {len(during):,} |")
    for label, q in (("RTT p50", 0.5), ("RTT p99", 0.99), ("RTT max", 1.0)):
        print(f"| {label} | {ms(percentile(before, q))} | {ms(percentile(during, q))} |")
    cut = f"{u.cut} of {hp.uncut_sessions}"
    if u.cut_reasons:
        cut += " (" + ", ".join(f"{k} {v}" for k, v in u.cut_reasons.most_common()) + ")"
    print(
        f"uncut sessions cut: {cut}; messages lost: {u.lost} of {u.sent:,} sent"
        f" ({u.received:,} back, {u.duplicates} duplicates)"
    )
    print(flush=True)


def check_haproxy(hp: HAProxyPhase, wanted: int) -> list[str]:
    """The phase's own checks; the common ones are ``storm.check`` on ``hp.phase``."""
    problems = []
    if hp.uncut_sessions != wanted:
        problems.append(f"haproxy: {hp.uncut_sessions} of {wanted} uncut sessions opened")
    if hp.uncut.cut:
        problems.append(f"haproxy: {hp.uncut.cut} uncut sessions were cut")
    if hp.uncut.lost:
        problems.append(f"haproxy: {hp.uncut.lost} round-trip messages lost")
    if not window(hp.uncut, *hp.storm):
        problems.append("haproxy: no round trip measured during the storm")
    return problems


def run_only(args: argparse.Namespace) -> HAProxyPhase:
    """The phase alone: its own devices, database and upstream Mosquitto."""
    with setup(args.devices, args.sources, args.keep) as s:
        upstream = mosquitto_server(s.work, None, "upstream")
        upstream.start()
        fleet = Fleet(s.members, procs=args.procs)
        try:
            return haproxy_phase(args, s, upstream, fleet)
        finally:
            fleet.close()
            with contextlib.suppress(Exception):
                upstream.stop()
